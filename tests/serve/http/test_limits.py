"""Under load and faults: a client that drops mid-stream frees its batch row at once; a burst of 200
connections against a small --max-concurrency gets 429s with Retry-After for the excess, the admitted
ones finish, nothing hangs and the server returns to idle."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from http_fixtures import BASE, adapter_dirs, openai_client, serving, wait_idle  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    with serving(tiny_model_dir, smollm_tokenizer, {"r4": adapter_dirs["r4"]}, max_concurrency=4,
                 engine_config={"max_seq_len": 256, "max_batch_size": 4}) as s:
        yield s


def test_a_client_dropping_mid_stream_frees_its_row(server):
    import httpx2 as httpx

    body = {"model": "r4", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True}
    # the engine pauses after its first step with the request running (from its own thread, so that the request
    # cannot finish by itself before the client leaves)
    paused, resume, step = threading.Event(), threading.Event(), server.engine.step

    def step_then_pause() -> bool:
        worked = step()
        if not resume.is_set() and server.engine.rows:
            paused.set()
            resume.wait(60)
        return worked

    server.engine.step = step_then_pause
    try:
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert paused.wait(30)  # the request holds a batch row
            handle = server.engine.rows[0].handle
            r.close()  # the client leaves
            deadline = time.monotonic() + 30
            while not handle.cancelled and time.monotonic() < deadline:
                time.sleep(0.005)
            assert handle.cancelled
    finally:
        resume.set()
        del server.engine.step  # the engine's own method again
    stats = wait_idle(server)
    assert stats["running"] == 0 and server.state.gate.in_flight == 0
    assert handle.completion.finish_reason == "abort" and handle.completion.completion_tokens < 200
    assert openai_client(server.url).completions.create(model="r4", prompt="Hi", max_tokens=3).choices[0].text is not None


async def one_client(client, url: str, k: int) -> tuple[int, bool, str | None]:
    body = {"model": "r4" if k % 2 else BASE, "prompt": f"Request {k}", "max_tokens": 8, "temperature": 0,
            "stream": True, "ignore_eos": True}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        text = "\n".join([line async for line in r.aiter_lines()])
        return r.status_code, text.rstrip().endswith("data: [DONE]"), r.headers.get("retry-after")


def test_a_burst_of_200_connections_gets_429_for_the_excess_and_nothing_hangs(server):
    import httpx2 as httpx

    async def burst():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one_client(client, server.url, k) for k in range(200))), 300)

    results = asyncio.run(burst())
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) >= 4
    assert all(done for s, done, _ in results if s == 200)  # every admitted stream finished
    assert all(retry == "1" for s, _, retry in results if s == 429)
    stats = wait_idle(server)
    assert stats["running"] == 0 and stats["queued"] == 0 and server.state.gate.in_flight == 0
    assert openai_client(server.url).completions.create(model=BASE, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
