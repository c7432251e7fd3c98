"""The README's playground screenshot: `lorakit serve` on the default model with an adapter, the page in
headless Chromium (Debian's `chromium`, driven by playwright), one prompt sent to the base and the adapter.

    python benchmarks/serve_playground_screenshot.py --adapter runs/demo/adapter --out docs/serve-playground.png
    python benchmarks/serve_playground_screenshot.py     # without --adapter: a random rank-8 adapter (B != 0)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lorakit.serve import Engine, EngineConfig
from lorakit.serve.http.config import ServeConfig
from lorakit.serve.http.server import BackgroundServer, build_app

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--prompt", default="Convert the order note to an order record.\n\n"
                        "Sarah Wang wants 12 yellow benches delivered to Tokyo before November 7.")  # the task's form
    parser.add_argument("--out", default="docs/serve-playground.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    engine = Engine.from_pretrained("default", EngineConfig(max_batch_size=4, max_seq_len=512))
    if args.adapter is None:  # a random rank-8 adapter on all 7 projections, as `lorakit bench serve` writes them
        from lorakit.tools.serve_workload import BenchServeConfig, write_adapters

        args.adapter = write_adapters(engine.model, Path(tempfile.mkdtemp()), BenchServeConfig(), 1)[0]
        args.name = args.name or "random-r8"
    args.name = args.name or "orders"
    engine.load_adapter(args.name, args.adapter)
    engine.start()
    with BackgroundServer(build_app(engine, ServeConfig())) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 620})
        page.goto(server.url + "/")
        page.wait_for_selector(f'#models input[data-model="{args.name}"]')
        page.fill("#prompt", args.prompt)
        page.fill("#max_tokens", "48")
        page.click("#send")
        page.wait_for_function("[...document.querySelectorAll('.card')].every(c => c.dataset.state === 'done')",
                               timeout=600_000)
        page.screenshot(path=args.out)
        for card in page.query_selector_all(".card"):
            print(card.get_attribute("data-model"), "|", card.query_selector(".stats").inner_text(), "|",
                  card.query_selector(".out").text_content())
        browser.close()
    engine.stop()


if __name__ == "__main__":
    main()
