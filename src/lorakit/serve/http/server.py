"""Running the server: `run_serve` (the `lorakit serve` command, on the main thread, stopping cleanly on
SIGTERM/SIGINT) and `BackgroundServer` (a server on a thread, for tests and benchmarks).

On SIGTERM uvicorn stops accepting connections and lets the requests in flight finish for up to
--shutdown-timeout seconds (cutting what is left then); the engine is stopped after that.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.serve.http.config import ServeConfig


def check_installed() -> None:
    """Raise LorakitError naming the extra to install when the server's libraries are missing."""
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise LorakitError(f"lorakit serve needs {', '.join(missing)}: pip install 'lorakit[serve]'.")


def build_state(engine: Any, cfg: ServeConfig, base_name: str | None = None):
    """The routes' shared state for `engine` under `cfg`'s limits."""
    from lorakit.serve.http.generation import ServerState
    from lorakit.serve.http.limits import ConcurrencyGate
    from lorakit.serve.http.metrics import Metrics

    gate = ConcurrencyGate(cfg.max_concurrency)
    root = None
    if cfg.adapter_dir is not None:
        root = Path(cfg.adapter_dir)
        if not root.is_dir():
            raise LorakitError(f"--adapter-dir {cfg.adapter_dir}: no such directory.")
    name = base_name or cfg.served_model_name or cfg.model or "default"
    return ServerState(engine, gate, Metrics(engine, gate), name, root, drain_timeout_s=cfg.shutdown_timeout)


def build_app(engine: Any, cfg: ServeConfig, base_name: str | None = None):
    """The ASGI app over a started engine, with `cfg`'s key and limits."""
    from lorakit.serve.http.app import create_app

    state = build_state(engine, cfg, base_name)
    api_key = cfg.api_key or os.environ.get("LORAKIT_API_KEY") or None
    return create_app(state, api_key=api_key, max_body_bytes=cfg.max_body_bytes)


def load_engine(cfg: ServeConfig):
    """The engine on cfg.model with cfg's adapters loaded (not yet started)."""

    from lorakit.serve import Engine, EngineConfig
    from lorakit.training.models import as_device, compute_dtype, default_device

    device = as_device(cfg.device) if cfg.device else default_device()
    engine_cfg = EngineConfig(max_batch_size=cfg.max_batch_size, max_seq_len=cfg.max_seq_len,
                              max_loaded_adapters=cfg.max_loaded_adapters)
    engine = Engine.from_pretrained(cfg.model, engine_cfg, dtype=compute_dtype(cfg.precision, device), device=str(device))
    for name, directory in cfg.adapters().items():
        engine.load_adapter(name, directory)
    return engine


def run_serve(cfg: ServeConfig) -> None:
    """`lorakit serve`: load the model and adapters, serve until SIGTERM/SIGINT, drain, stop."""
    check_installed()
    import uvicorn

    engine = load_engine(cfg).start()
    try:
        app = build_app(engine, cfg)
        for name, directory in cfg.adapters().items():
            app.state.lorakit.adapter_sources[name] = directory
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=cfg.shutdown_timeout, lifespan="off")
        server = uvicorn.Server(config)
        server.capture_signals = lambda: _graceful_signals(server)
        _announce(server, cfg, app.state.lorakit)
        server.run()
    finally:
        engine.stop(drain_timeout=0)
    print("lorakit serve: stopped", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _graceful_signals(server):
    """SIGTERM/SIGINT start uvicorn's graceful shutdown; unlike uvicorn's own handling, the signal is not
    raised again afterwards, so the engine is stopped and the process exits 0 once the drain is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _announce(server, cfg: ServeConfig, state) -> None:
    """Print where the server listens once uvicorn has bound (port 0 picks a free one)."""
    started = server.startup

    async def startup(*args, **kwargs):
        await started(*args, **kwargs)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
        names = ", ".join([state.base_name] + sorted(state.engine.adapters))
        key = " (API key required)" if (cfg.api_key or os.environ.get("LORAKIT_API_KEY")) else ""
        print(f"lorakit serve: listening on http://{cfg.host}:{port}{key}; models: {names}", file=sys.stderr, flush=True)

    server.startup = startup


class BackgroundServer:
    """A uvicorn server for `app` on a thread, on 127.0.0.1 and a free port (for tests and benchmarks).

        with BackgroundServer(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False, lifespan="off", timeout_graceful_shutdown=5))
        self.host = host
        self.thread = threading.Thread(target=self.server.run, name="lorakit-http", daemon=True)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            raise LorakitError("the HTTP server did not start (see its log above).")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
