"""Stream tokens against real gateways: watch-only unless minted for cancel, valid across key rotation, dead with
their key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from services.topics import ensure_topics
from tests.integration.gateway_support import gateway_settings, running_gateway
from tests.integration.worker_helpers import announce

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


async def test_stream_tokens_scope_rotation_and_revocation(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = gateway_settings(kafka_bootstrap, topic_prefix, api_keys=("key-a", "key-b"), cache_dir=tmp_path)
    await ensure_topics(settings)
    await announce(settings)  # a model the gateway routes to, served by no worker
    answers = {}
    async with aiohttp.ClientSession() as session:

        async def status_with(url: str, rid: str, token: str) -> int:
            async with session.get(f"{url}/v1/requests/{rid}", params={"token": token}) as r:
                return r.status

        with running_gateway(settings) as gw:
            for key in ("key-a", "key-b"):
                headers = {"Authorization": f"Bearer {key}"}
                async with session.post(gw.url + "/v1/requests", json={"prompt": "p"}, headers=headers) as r:
                    assert r.status == 202
                    answers[key] = await r.json()
            a = answers["key-a"]
            assert await status_with(gw.url, a["id"], a["stream_token"]) == 200
            # The token in the events URL (what a browser holds) can watch but not cancel.
            async with session.post(f"{gw.url}/v1/requests/{a['id']}/cancel", params={"token": a["stream_token"]}) as r:
                assert r.status == 403, r.status
                assert (await r.json())["error"]["code"] == "forbidden"
            async with session.post(f"{gw.url}/v1/requests/{a['id']}/cancel", params={"token": a["cancel_token"]}) as r:
                assert r.status == 202, r.status
            async with session.post(f"{gw.url}/v1/requests/{a['id']}/cancel", params={"token": "AAAA"}) as r:
                assert r.status == 401

        # A key is added: every outstanding token stays valid, on a restarted gateway and on a second one.
        rotated = replace(settings, api_keys=("key-c", "key-b", "key-a"))
        other = replace(rotated, gateway_port=gateway_settings(kafka_bootstrap, topic_prefix).gateway_port)
        with running_gateway(rotated) as gw, running_gateway(other) as gw2:
            for url in (gw.url, gw2.url):
                for key in ("key-a", "key-b"):
                    assert await status_with(url, answers[key]["id"], answers[key]["stream_token"]) == 200, (url, key)

        # Key A is revoked: its tokens die with it; key B's live on.
        revoked = replace(settings, api_keys=("key-b", "key-c"))
        with running_gateway(revoked) as gw:
            a, b = answers["key-a"], answers["key-b"]
            assert await status_with(gw.url, a["id"], a["stream_token"]) == 401
            async with session.post(f"{gw.url}/v1/requests/{a['id']}/cancel", params={"token": a["cancel_token"]}) as r:
                assert r.status == 401
            assert await status_with(gw.url, b["id"], b["stream_token"]) == 200
