"""The playground and the browser example in headless Chromium: tokens stream, EventSource survives a gateway SIGKILL
and restart, multi-turn chat, Stop, Markdown, the model picker; screenshots go to TOKENRELAY_TEST_SCREENSHOTS (or the
test's temporary directory)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas.ids import new_request_id
from services.topics import ensure_topics
from tests.integration.browser_support import ARGS, CHROMIUM, needs_chromium, screenshots
from tests.integration.gateway_support import (
    EventWriter,
    GatewayProcess,
    gateway_settings,
    read_sse,
    running_gateway,
    running_worker,
    scripted_stream,
)

STATIC = Path(__file__).resolve().parents[2] / "gateway" / "http" / "static"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.timeout(240),
    needs_chromium,
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
            assert await page.locator(".mark").count() == 0
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
        # The answer is rendered as Markdown (a paragraph), which drops the first token's leading space.
        assert "".join(expected_tokens).strip() in page_text.replace("connection lost", "").replace("resumed", "")
    finally:
        gw.stop()
    await asyncio.sleep(0)


async def test_markdown_renderer_builds_safe_elements() -> None:
    from playwright.async_api import async_playwright

    source = (
        "# Title\n\nSome **bold**, *italic* and `code`.\n\n- one\n- two with [a link](https://example.org)\n\n"
        "1. first\n2. second\n\n```python\nprint('<b>hi</b>')\n```\n\n> quoted\n\n"
        "<script>window.pwned = 1</script> <img src=x onerror='window.pwned=1'> [bad](javascript:alert(1))"
    )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.set_content("<div id=o></div>")
        await page.add_script_tag(path=str(STATIC / "markdown.js"))
        html = await page.evaluate(
            "(s) => { const o = document.getElementById('o'); o.append(renderMarkdown(s)); return o.innerHTML; }",
            source,
        )
        pwned = await page.evaluate("window.pwned === undefined")
        await browser.close()
    assert html.startswith("<h3>Title</h3><p>Some <strong>bold</strong>, <em>italic</em> and <code>code</code>.</p>")
    assert '<ul><li>one</li><li>two with <a href="https://example.org"' in html
    assert "<ol><li>first</li><li>second</li></ol>" in html
    assert "<pre><code class=\"language-python\">print('&lt;b&gt;hi&lt;/b&gt;')</code></pre>" in html
    assert "<blockquote><p>quoted</p></blockquote>" in html
    # Markup in model text stays text; a javascript: link stays text.
    assert "&lt;script&gt;" in html and "&lt;img" in html and "<script" not in html and "<img" not in html
    assert "[bad](javascript:alert(1))" in html and 'href="javascript' not in html
    assert pwned


@pytest.fixture
def synthetic_stack(kafka_bootstrap: str, topic_prefix: str) -> Iterator[GatewayProcess]:
    """A gateway and a synthetic-engine worker (40 tokens/s per request) on fresh topics."""
    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    asyncio.run(ensure_topics(settings))
    with (
        running_worker(settings, TOKENRELAY_ENGINE="synthetic", TOKENRELAY_SYNTHETIC_TOKENS_PER_S="40"),
        running_gateway(settings) as gw,
    ):
        yield gw


async def test_stop_button_cancels_and_the_example_page_runs_as_given(
    synthetic_stack: GatewayProcess, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    gw = synthetic_stack
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.goto(f"{gw.url}/")
        await page.fill("#max", "500")
        await page.fill("#prompt", "count slowly")
        await page.press("#prompt", "Enter")
        await page.wait_for_function("window.tokenrelay && window.tokenrelay.tokens.length >= 3", timeout=60_000)
        assert await page.is_enabled("#stop")
        await page.click("#stop")
        await page.wait_for_function("window.tokenrelay.done !== null", timeout=30_000)
        state = await page.evaluate("window.tokenrelay")
        meta = await page.inner_text(".msg.assistant .meta")
        await page.screenshot(path=str(screenshots(tmp_path) / "playground-stopped.png"), full_page=True)
        assert state["done"]["finish_reason"] == "cancelled", state["done"]
        assert 3 <= state["done"]["usage"]["completion_tokens"] < 500
        assert meta.startswith("cancelled") and not await page.is_enabled("#stop")

        # The browser example, exactly as served: same origin, relative URLs.
        example = await browser.new_page()
        errors: list[str] = []
        example.on("pageerror", lambda exc: errors.append(str(exc)))
        await example.goto(f"{gw.url}/examples/")
        await example.click("#ask")
        await example.wait_for_function("window.answer !== undefined", timeout=60_000)
        answer = await example.evaluate("window.answer")
        shown = await example.inner_text("#out")
        await example.screenshot(path=str(screenshots(tmp_path) / "example.png"))
        await browser.close()
    assert errors == []
    assert answer["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 64
    assert len(shown.split()) == 64  # one synthetic word per token


async def test_playground_multi_turn_chat_with_the_built_in_model(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    from playwright.async_api import Request, async_playwright

    settings = gateway_settings(kafka_bootstrap, topic_prefix)
    await ensure_topics(settings)
    with running_worker(settings, TOKENRELAY_ENGINE="model"), running_gateway(settings) as gw:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport={"width": 900, "height": 900})
            sent: list[dict[str, Any]] = []

            def record(request: Request) -> None:
                body = request.post_data_json
                if request.url.endswith("/v1/requests") and body is not None:
                    sent.append(body)

            page.on("request", record)
            await page.goto(f"{gw.url}/")
            await page.wait_for_function("document.querySelector('#model').options[0].value === 'default'")
            await page.eval_on_selector(
                "#temperature", "(e) => { e.value = '0'; e.dispatchEvent(new Event('input')); }"
            )
            assert await page.inner_text("#temperature-v") == "0"
            answers = []
            for question in ("What is a Kafka topic?", "What is a partition?"):
                await page.fill("#prompt", question)
                await page.press("#prompt", "Enter")
                await page.wait_for_function(
                    "window.tokenrelay && window.tokenrelay.done !== null && !document.querySelector('.streaming')",
                    timeout=180_000,
                )
                state = await page.evaluate("window.tokenrelay")
                assert state["done"]["finish_reason"] in ("stop", "length"), state["done"]
                answers.append("".join(state["tokens"]))
            bubbles = await page.locator(".msg.assistant .body").all_inner_texts()
            await page.screenshot(path=str(screenshots(tmp_path) / "playground-chat.png"), full_page=True)
            await browser.close()
    assert len(sent) == 2
    assert sent[0]["messages"] == [{"role": "user", "content": "What is a Kafka topic?"}]
    assert sent[0]["temperature"] == 0 and sent[0]["model"] == "default" and sent[0]["max_tokens"] == 128
    # The second turn carries the first question and answer: a conversation, not two single prompts.
    assert sent[1]["messages"] == [
        {"role": "user", "content": "What is a Kafka topic?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "What is a partition?"},
    ]
    assert all(answer.strip() for answer in answers)
    assert [" ".join(b.split()) for b in bubbles] == [" ".join(a.split()) for a in answers]


async def test_markdown_links_stay_on_this_origin_and_deep_quotes_render() -> None:
    from playwright.async_api import async_playwright

    links = "[a](//evil.example) [b](/\\evil.example) [c](/\\/evil.example) [ok](/v1/models) [ok2](./x) [ok3](#top)"
    deep = ">" * 20_000 + " bottom"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = await browser.new_page()
        await page.set_content("<div id=o></div><div id=q></div>")
        await page.add_script_tag(path=str(STATIC / "markdown.js"))
        hrefs = await page.evaluate(
            "(s) => { const o = document.getElementById('o'); o.append(renderMarkdown(s));"
            " return [...o.querySelectorAll('a')].map(a => a.getAttribute('href')); }",
            links,
        )
        quoted = await page.evaluate(
            "(s) => { try { const q = document.getElementById('q'); q.append(renderMarkdown(s));"
            " return [q.querySelectorAll('blockquote').length, q.textContent.includes('bottom')]; }"
            " catch (e) { return String(e); } }",
            deep,
        )
        await browser.close()
    # Only links that stay on this origin (or name their scheme): a protocol-relative one goes elsewhere.
    assert hrefs == ["/v1/models", "./x", "#top"]
    assert isinstance(quoted, list) and 0 < quoted[0] <= 32 and quoted[1], quoted
