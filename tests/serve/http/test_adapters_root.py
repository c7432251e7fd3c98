"""Adapters at run time: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names), only
inside --adapter-dir: `..`, absolute paths elsewhere and symlinks leaving the root are refused, a corrupt
adapter is refused with nothing else changed, and unloading waits for the requests that use it."""
from __future__ import annotations

import os
import shutil
import threading

import pytest
from http_fixtures import BASE, adapter_dirs, adapter_root, openai_client, serving, wait_idle  # noqa: F401

from lorakit import LorakitError
from lorakit.serve.http.adapters_root import resolve_inside


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm_tokenizer, adapter_root):
    with serving(tiny_model_dir, smollm_tokenizer, adapter_dir=str(adapter_root), engine_config={"max_seq_len": 512}) as s:
        yield s


def post(server, path, body):
    import httpx2 as httpx

    return httpx.post(server.url + path, json=body, timeout=60)


def test_resolve_inside_refuses_escapes(adapter_root):
    assert resolve_inside(adapter_root, "r4") == (adapter_root / "r4").resolve()
    assert resolve_inside(adapter_root, str(adapter_root / "r4")) == (adapter_root / "r4").resolve()
    for bad in ("../secret", "r4/../../secret", str(adapter_root.parent / "secret"), "/etc", "", "r4\x00", "missing"):
        with pytest.raises(LorakitError):
            resolve_inside(adapter_root, bad)
    link = adapter_root / "escape"
    link.symlink_to(adapter_root.parent / "secret", target_is_directory=True)
    try:
        with pytest.raises(LorakitError, match="outside"):
            resolve_inside(adapter_root, "escape")
    finally:
        link.unlink()


def test_load_use_and_unload_at_run_time(server):
    client = openai_client(server.url)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "orders", "lora_path": "r4"})
    assert r.status_code == 200, r.text
    models = {m.id: m for m in client.models.list()}
    assert models["orders"].parent == BASE
    with_adapter = client.completions.create(model="orders", prompt="Hello", max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].text
    base = client.completions.create(model=BASE, prompt="Hello", max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert with_adapter != base
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "orders", "lora_path": "r4"}).status_code == 400  # taken
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "orders"}).status_code == 200
    assert "orders" not in {m.id for m in client.models.list()}
    assert post(server, "/v1/completions", {"model": "orders", "prompt": "Hi", "max_tokens": 2}).status_code == 404
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "orders"}).status_code == 404


@pytest.mark.parametrize("path", ["../secret", "r4/../../secret", "/etc", "ESCAPE", "missing"])
def test_loads_outside_the_root_are_refused(server, adapter_root, path):
    link = adapter_root / "ESCAPE"
    if not link.exists():
        link.symlink_to(adapter_root.parent / "secret", target_is_directory=True)
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "sneaky", "lora_path": path})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert "sneaky" not in server.engine.adapters


def test_a_corrupt_adapter_is_refused_and_nothing_changes(server, adapter_root):
    bad = adapter_root / "corrupt"
    shutil.copytree(adapter_root / "r4", bad, dirs_exist_ok=True)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "good", "lora_path": "patterns"}).status_code == 200
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "corrupt", "lora_path": "corrupt"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
    assert set(server.engine.adapters) == {"good"}
    assert post(server, "/v1/completions", {"model": "good", "prompt": "Hi", "max_tokens": 2}).status_code == 200
    for body in ({"lora_name": "x"}, {"lora_name": 3, "lora_path": "r4"}, {"lora_name": "a b", "lora_path": "r4"}):
        assert post(server, "/v1/load_lora_adapter", body).status_code == 400
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "good"}).status_code == 200


def test_unloading_waits_for_the_requests_that_use_it(server):
    import time

    assert post(server, "/v1/load_lora_adapter", {"lora_name": "busy", "lora_path": "r8dora"}).status_code == 200
    # the engine pauses after its first step with the request running, so what follows cannot race the request's
    # end (pausing from the test's thread after the first streamed chunk raced it: a fast engine had finished)
    paused, resume, step = threading.Event(), threading.Event(), server.engine.step

    def step_then_pause() -> bool:
        worked = step()
        if not resume.is_set() and any(r.handle.request.adapter == "busy" for r in server.engine.rows):
            paused.set()
            resume.wait(60)
        return worked

    server.engine.step = step_then_pause
    try:
        client = openai_client(server.url)
        stream = iter(client.completions.create(model="busy", prompt="Hello", max_tokens=100, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True}))
        assert paused.wait(30)  # the request is running on the adapter
        unloaded = {}
        thread = threading.Thread(target=lambda: unloaded.update(r=post(server, "/v1/unload_lora_adapter",
                                                                        {"lora_name": "busy"})))
        thread.start()
        deadline = time.monotonic() + 30
        while "busy" not in server.state.draining and time.monotonic() < deadline:
            time.sleep(0.005)
        # draining: new requests for it are refused, but it stays loaded while its request runs
        assert post(server, "/v1/completions", {"model": "busy", "prompt": "Hi", "max_tokens": 2}).status_code == 404
        assert "busy" in server.engine.adapters and "r" not in unloaded
    finally:
        resume.set()
        del server.engine.step  # the engine's own method again
    chunks = list(stream)
    thread.join(timeout=120)
    assert unloaded["r"].status_code == 200
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "busy" not in server.engine.adapters and wait_idle(server)["running"] == 0


def test_loading_is_off_without_an_adapter_dir(tiny_model_dir, smollm_tokenizer, adapter_root):
    with serving(tiny_model_dir, smollm_tokenizer) as plain:
        r = post(plain, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(adapter_root / "r4")})
        assert r.status_code == 404 and "--adapter-dir" in r.json()["error"]["message"]
    assert os.path.isdir(adapter_root / "r4")
