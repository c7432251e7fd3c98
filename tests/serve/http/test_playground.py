"""The playground page in a real headless Chromium (Debian's `chromium`, driven by playwright): it lists the
models, sends one prompt to the base and an adapter at once, and shows two different streamed answers,
each equal to what the API gives for the same greedy request.

`make setup-browser` (part of `make test`) installs Chromium; without it this test is skipped, saying so.
Set LORAKIT_PLAYGROUND_SCREENSHOT=path.png to keep a screenshot."""
from __future__ import annotations

import os
import shutil

import pytest
from http_fixtures import BASE, adapter_dirs, openai_client, serving  # noqa: F401 (fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed: run `make setup-browser` "
                                                          "(apt-get install chromium) to test the playground page")


def test_playground_streams_base_and_adapter_side_by_side(tiny_model_dir, smollm_tokenizer, adapter_dirs, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with serving(tiny_model_dir, smollm_tokenizer, {"r4": adapter_dirs["r4"], "dora": adapter_dirs["r8dora"]}) as server, \
            playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 700})
            page.goto(server.url + "/")
            page.wait_for_selector(f'#models input[data-model="{BASE}"]')
            page.uncheck('#models input[data-model="dora"]')  # the base and one adapter
            page.fill("#prompt", "Name a colour.")
            page.fill("#max_tokens", "16")
            page.fill("#temperature", "0")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.card').length === 2 && "
                                   "[...document.querySelectorAll('.card')].every(c => c.dataset.state === 'done')",
                                   timeout=120_000)
            shown = {c.get_attribute("data-model"): c.query_selector(".out").text_content()
                     for c in page.query_selector_all(".card")}
            stats = [s.inner_text() for s in page.query_selector_all(".card .stats")]
            page.screenshot(path=os.environ.get("LORAKIT_PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png"))
        finally:
            browser.close()
        client = openai_client(server.url)
        expected = {m: client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Name a colour."}],
                                                      max_tokens=16, temperature=0).choices[0].message.content
                    for m in (BASE, "r4")}
    assert set(shown) == {BASE, "r4"}
    assert shown[BASE] and shown["r4"] and shown[BASE] != shown["r4"]
    assert shown == expected  # the page shows exactly the text the API streams
    assert all("tokens/s" in s for s in stats)
