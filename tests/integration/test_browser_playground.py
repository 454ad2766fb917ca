"""The playground in headless Chromium: tokens stream, and EventSource survives a gateway SIGKILL and restart."""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import pytest

from schemas.ids import new_request_id
from services.topics import ensure_topics
from tests.integration.gateway_support import EventWriter, GatewayProcess, gateway_settings, read_sse, scripted_stream

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (make browser)"),
]


async def test_eventsource_survives_gateway_restart(kafka_bootstrap: str, topic_prefix: str) -> None:
    from playwright.async_api import async_playwright

    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    rid = new_request_id()
    events = scripted_stream(rid, 20)
    gw = GatewayProcess(settings)
    gw.start()
    try:
        async with async_playwright() as pw, EventWriter(settings) as writer:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page()
            await page.goto(f"{gw.url}/?events=/v1/requests/{rid}/events")
            await page.wait_for_function("window.tokenrelay !== undefined")
            await writer.publish(*events[:8])
            await page.wait_for_function("window.tokenrelay.tokens.length >= 7")
            gw.kill()
            await page.wait_for_function("window.tokenrelay.drops >= 1")
            await writer.publish(*events[8:15])
            gw.start()
            await page.wait_for_function("window.tokenrelay.resumes >= 1", timeout=30_000)
            await writer.publish(*events[15:])
            await page.wait_for_function("window.tokenrelay.done !== null", timeout=30_000)
            state = await page.evaluate("window.tokenrelay")
            page_text = await page.inner_text("#out")
            await browser.close()
        async with aiohttp.ClientSession() as session:
            _, log_view = await read_sse(session, f"{gw.url}/v1/requests/{rid}/events")
        expected_tokens = [json.loads(e["data"])["text"] for e in log_view if e["event"] == "token"]
        assert state["tokens"] == expected_tokens and len(expected_tokens) == 20
        assert state["ids"] == [e["id"] for e in log_view]
        assert state["done"]["usage"]["completion_tokens"] == 20
        assert "connection lost" in page_text and "resumed" in page_text
        assert "".join(expected_tokens) in page_text.replace("connection lost", "").replace("resumed", "")
    finally:
        gw.stop()
    await asyncio.sleep(0)
