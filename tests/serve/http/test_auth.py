"""--api-key: every route but the playground page and /health needs `Authorization: Bearer KEY`."""
from __future__ import annotations

import openai
import pytest
from http_fixtures import BASE, openai_client, serving


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm_tokenizer):
    with serving(tiny_model_dir, smollm_tokenizer, api_key="s3cret") as s:
        yield s


def test_missing_or_wrong_key_is_401_in_openai_shape(server):
    import httpx2 as httpx

    body = {"model": BASE, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
        r = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/").status_code == 200  # the page asks for the key itself


def test_the_right_key_works_through_the_openai_client(server):
    with pytest.raises(openai.AuthenticationError):
        openai_client(server.url, api_key="wrong").models.list()
    client = openai_client(server.url, api_key="s3cret")
    assert [m.id for m in client.models.list()] == [BASE]
    assert client.completions.create(model=BASE, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
