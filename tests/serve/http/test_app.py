"""The real `openai` client against `lorakit serve` on a tiny fp32 Llama: models list, completions and chat
completions, streamed and not, equal to the engine's own text for the same greedy request; the base and
two adapters requested at once each get their own answer; usage, stop strings, n, metrics."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from http_fixtures import BASE, adapter_dirs, openai_client, serving  # noqa: F401 (fixture)

from lorakit.serve import Request, SamplingParams

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    adapters = {"r4": adapter_dirs["r4"], "dora": adapter_dirs["r8dora"]}
    with serving(tiny_model_dir, smollm_tokenizer, adapters) as s:
        yield s


def engine_text(server, prompt, adapter, n, **params) -> str:
    """What the engine itself answers (its own handle, not HTTP)."""
    request = Request(prompt, adapter=adapter, params=SamplingParams(max_tokens=n, **params))
    return server.engine.submit(request).result().text


def test_models_list_names_the_base_and_adapters_with_their_parent(server):
    models = {m.id: m for m in openai_client(server.url).models.list()}
    assert set(models) == {BASE, "r4", "dora"}
    assert models["r4"].parent == BASE and models["dora"].parent == BASE and models[BASE].parent is None


@pytest.mark.parametrize("model", [BASE, "r4", "dora"])
def test_completion_equals_the_engine(server, model):
    client, prompt = openai_client(server.url), "The history of the printing press"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    adapter = None if model == BASE else model
    assert out.choices[0].text == engine_text(server, prompt, adapter, 12, ignore_eos=True)
    assert out.choices[0].finish_reason == "length"
    n_prompt = len(server.engine.prompt_ids(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert out.model == model and out.object == "text_completion"


def test_streamed_chat_equals_the_engine_and_reports_usage(server):
    client = openai_client(server.url)
    chunks = list(client.chat.completions.create(model="dora", messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine_text(server, CHAT, "dora", 10, ignore_eos=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(server.engine.prompt_ids(CHAT))
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_not_streamed_equals_streamed(server):
    client = openai_client(server.url)
    whole = client.chat.completions.create(model="r4", messages=CHAT, max_tokens=9, temperature=0)
    streamed = client.chat.completions.create(model="r4", messages=CHAT, max_tokens=9, temperature=0, stream=True)
    assert whole.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    assert whole.choices[0].message.content == engine_text(server, CHAT, "r4", 9)


def test_base_and_two_adapters_at_once_each_get_their_own_answer(server):
    client, prompt = openai_client(server.url), "Once upon a time in a small town there lived"
    models = [BASE, "r4", "dora"] * 2

    def ask(model):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(ask, models))
    expected = {m: engine_text(server, prompt, None if m == BASE else m, 16, ignore_eos=True) for m in set(models)}
    assert answers == [expected[m] for m in models]
    assert len(set(expected.values())) == 3  # the adapters really change the answer


def test_token_id_prompts_stop_strings_and_n(server):
    client = openai_client(server.url)
    ids = server.engine.prompt_ids("Hello world")
    full = client.completions.create(model="r4", prompt=ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert text == engine_text(server, "Hello world", "r4", 12, ignore_eos=True)
    stop = text[3:6]
    cut = client.completions.create(model="r4", prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model=BASE, prompt=["Hello", "Goodbye"], n=2, max_tokens=6, temperature=0.9, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    again = client.completions.create(model=BASE, prompt=["Hello", "Goodbye"], n=2, max_tokens=6, temperature=0.9, seed=3)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert many.usage.prompt_tokens == len(server.engine.prompt_ids("Hello")) + len(server.engine.prompt_ids("Goodbye"))


def test_metrics_count_requests_and_tokens(server):
    import httpx2 as httpx

    openai_client(server.url).completions.create(model="r4", prompt="Hi", max_tokens=3, temperature=0,
                                                 extra_body={"ignore_eos": True})
    text = httpx.get(server.url + "/metrics").text
    assert 'lorakit_requests_total{route="/v1/completions",status="200"}' in text
    assert 'lorakit_generation_tokens_total{model="r4"}' in text
    assert "lorakit_time_to_first_token_seconds_bucket" in text and "lorakit_adapters_loaded 2.0" in text
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
