"""The playground on the Responses API in headless Chromium: a background response's EventSource survives a gateway
SIGKILL and restart, resuming after its last sequence number."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from services.topics import ensure_topics
from tests.integration.browser_support import ARGS, CHROMIUM, needs_chromium, screenshots
from tests.integration.gateway_support import GatewayProcess, gateway_settings, running_worker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    needs_chromium,
]


async def test_playground_resumes_a_background_response_after_a_gateway_restart(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    gw = GatewayProcess(settings)
    with running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="20"):
        gw.start()
        try:
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = await browser.new_page()
                await page.goto(f"{gw.url}/")
                await page.check("#responses")
                await page.fill("#max", "80")
                await page.fill("#prompt", "tell me a long story")
                await page.press("#prompt", "Enter")
                streaming = "window.tokenrelay && window.tokenrelay.tokens.length >= 5"
                await page.wait_for_function(streaming, timeout=60_000)
                gw.kill()
                await page.wait_for_function("window.tokenrelay.drops >= 1")
                gw.start()
                await page.wait_for_function("window.tokenrelay.done !== null", timeout=60_000)
                state = await page.evaluate("window.tokenrelay")
                page_text = await page.inner_text("#out")
                await page.screenshot(path=str(screenshots(tmp_path) / "playground-responses.png"), full_page=True)
                await browser.close()
            api = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
            whole = await api.responses.retrieve(state["id"])
            await api.close()
        finally:
            gw.stop()
    assert state["resumes"] >= 1 and "connection lost" in page_text and "resumed" in page_text
    numbers = [int(n) for n in state["ids"]]
    assert numbers == sorted(set(numbers))  # each event once, in order, across the restart
    assert "".join(state["tokens"]) == whole.output_text and whole.status == "incomplete"
    assert state["done"]["status"] == "incomplete" and state["done"]["usage"]["output_tokens"] == 80
