"""Abuse: every client mistake is a 4xx in OpenAI's shape (never a 5xx, which the openai client retries),
and the server goes on serving afterwards."""
from __future__ import annotations

import openai
import pytest
from http_fixtures import BASE, adapter_dirs, openai_client, serving  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    with serving(tiny_model_dir, smollm_tokenizer, {"r4": adapter_dirs["r4"]}, max_body_bytes=4096) as s:
        yield s


def post(server, path: str, body: bytes | dict, headers: dict | None = None):
    import httpx2 as httpx

    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    return httpx.post(server.url + path, headers=headers, timeout=60, **kw)


OK = {"model": BASE, "prompt": "Hello", "max_tokens": 2}
CASES = [  # (body, status, param)
    (b'{"model": "tiny", "prompt": "Hel', 400, None),  # truncated JSON
    (b"not json at all", 400, None),
    (b"\xff\xfe\x00garbage", 400, None),
    (b"[1, 2, 3]", 400, None),
    (b"", 400, None),
    ({"prompt": "Hello"}, 400, "model"),
    ({**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ({**OK, "max_tokens": -1}, 400, "max_tokens"),
    ({**OK, "max_tokens": 0}, 400, "max_tokens"),
    ({**OK, "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ({**OK, "temperature": "hot"}, 400, "temperature"),
    ({**OK, "temperature": -0.5}, 400, "temperature"),
    ({**OK, "top_p": 0}, 400, "top_p"),
    ({**OK, "stream": "yes"}, 400, "stream"),
    ({**OK, "n": 0}, 400, "n"),
    ({**OK, "seed": -3}, 400, "seed"),
    ({**OK, "stop": [1, 2]}, 400, "stop.str"),
    ({**OK, "prompt": ""}, 400, "prompt"),
    ({**OK, "prompt": [10 ** 9]}, 400, "prompt"),
    ({**OK, "prompt": {"a": 1}}, 400, "prompt.str"),
    ({**OK, "logprobs": 3}, 400, "logprobs"),
    ({**OK, "frobnicate": True}, 400, "frobnicate"),
    ({**OK, "prompt": "word " * 400}, 400, "prompt"),  # over the 128-token context
    ({**OK, "model": "no-such-adapter"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", CASES)
def test_client_mistakes_get_a_4xx_in_openai_shape(server, body, status, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param.split(".")[0])
    assert post(server, "/v1/completions", OK).status_code == 200  # still serving


def test_chat_mistakes(server):
    good = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    for bad in ({**good, "messages": []}, {**good, "messages": [{"role": "wizard", "content": "x"}]},
                {**good, "messages": [{"role": "user"}]}, {**good, "messages": "Hi"},
                {**good, "tools": [{"type": "function"}]}, {**good, "max_completion_tokens": -2}):
        r = post(server, "/v1/chat/completions", bad)
        assert r.status_code == 400, (bad, r.text)
    assert post(server, "/v1/chat/completions", good).status_code == 200


def test_the_openai_client_raises_its_own_error_classes_without_retrying(server):
    client = openai_client(server.url)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "word " * 400}], max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"


def test_oversized_bodies_get_413_declared_or_chunked(server):
    big = {**OK, "prompt": "x" * 5000}
    assert post(server, "/v1/completions", big).status_code == 413

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = post(server, "/v1/completions", chunks())  # no Content-Length: counted as it arrives
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert post(server, "/v1/completions", OK).status_code == 200


def test_unknown_routes_and_methods_are_4xx_in_openai_shape(server):
    import httpx2 as httpx

    r = httpx.get(server.url + "/v1/engines")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()
