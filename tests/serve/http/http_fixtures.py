"""Servers for the HTTP tests: a tiny fp32 Llama (SmolLM2's tokenizer) behind `lorakit serve`'s app, on a
free 127.0.0.1 port, with adapters (B != 0) from tests/serve/serve_fixtures.py."""
from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # serve_fixtures lives one floor up

from serve_fixtures import adapter_dirs, base_model  # noqa: E402,F401 (adapter_dirs is a fixture)

BASE = "tiny"


@contextmanager
def serving(model_dir, tokenizer, adapters: dict | None = None, engine_config: dict | None = None, **serve_config):
    """A started engine and a server over it; yields the server (its .url, .engine, .state)."""
    from lorakit.serve import Engine, EngineConfig
    from lorakit.serve.http.config import ServeConfig
    from lorakit.serve.http.server import BackgroundServer, build_app

    engine = Engine(base_model(model_dir), tokenizer, EngineConfig(**{"max_seq_len": 128, **(engine_config or {})}))
    for name, directory in (adapters or {}).items():
        engine.load_adapter(name, directory)
    engine.start()
    try:
        app = build_app(engine, ServeConfig(**serve_config), base_name=BASE)
        with BackgroundServer(app) as server:
            server.engine, server.state = engine, app.state.lorakit
            yield server
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def adapter_root(adapter_dirs, tmp_path_factory):
    """A --adapter-dir holding copies of the test adapters, and a secret adapter outside it."""
    root = tmp_path_factory.mktemp("adapter-root") / "adapters"
    root.mkdir()
    for name, directory in adapter_dirs.items():
        shutil.copytree(directory, root / name)
    outside = root.parent / "secret"
    shutil.copytree(adapter_dirs["r4"], outside)
    return root


def openai_client(url: str, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def wait_idle(server, timeout: float = 60.0) -> dict:
    """Wait (bounded) until the engine has no running or queued request and the gate is empty; the stats."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if stats["running"] == 0 and stats["queued"] == 0 and server.state.gate.in_flight == 0:
            return stats
        time.sleep(0.02)
    return {**server.engine.stats(), "in_flight": server.state.gate.in_flight}
