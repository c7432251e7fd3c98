"""The engine on a tiny fp32 Llama: every request of a mixed batch gets exactly the tokens it gets alone
from `model.generate` with only its adapter active, and from PEFT; plus continuous batching, unloading,
bounded adapter memory, stop strings, max_tokens, seeds, chat prompts, streaming and cancelling."""
from __future__ import annotations

import asyncio
import shutil

import pytest
from serve_fixtures import ADAPTERS, adapter_dirs, base_model, reference_tokens  # noqa: F401 (fixture)

from lorakit import LorakitError
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams

PROMPTS = ["The history of the printing press", "Hello", "def add(a, b):", "Once upon a time in a small town there lived"]


def make_engine(model_dir, tokenizer, adapter_dirs=None, **config) -> Engine:
    engine = Engine(base_model(model_dir), tokenizer, EngineConfig(**{"max_seq_len": 96, **config}))
    for name, directory in (adapter_dirs or {}).items():
        engine.load_adapter(name, directory)
    return engine


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


@pytest.mark.parametrize("strategy,prefill", [("fused", "with_decode"), ("gather", "with_decode"), ("segment", "with_decode"),
                                              ("fused", "separate"), ("gather", "separate"), ("segment", "separate")])
def test_mixed_batch_equals_each_request_alone_with_generate_and_peft(tiny_model_dir, smollm_tokenizer, adapter_dirs,
                                                                      strategy, prefill):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs, max_batch_size=4, lora_strategy=strategy,
                         prefill=prefill)
    # more requests than rows: they join as others leave (max_tokens differ, so rows leave at different steps)
    names = [None, *ADAPTERS, "r4", None, "peft"]
    requests = [Request(PROMPTS[i % len(PROMPTS)], adapter=name, params=greedy(4 + 2 * (i % 3)))
                for i, name in enumerate(names)]
    completions = engine.generate(requests)
    for request, completion in zip(requests, completions):
        prompt_ids = engine.prompt_ids(request.prompt)
        directory = None if request.adapter is None else adapter_dirs[request.adapter]
        n = request.params.max_tokens
        expected = reference_tokens(tiny_model_dir, directory, prompt_ids, n)
        assert completion.token_ids == expected, request.adapter
        assert completion.finish_reason == "length" and completion.completion_tokens == n
        assert completion.prompt_tokens == len(prompt_ids)
        if request.adapter is not None:
            assert reference_tokens(tiny_model_dir, directory, prompt_ids, n, peer="peft") == expected
    assert not engine.rows and not engine.queue


def test_adapters_change_the_output(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs)
    outs = engine.generate([Request(PROMPTS[0], adapter=a, params=greedy(8)) for a in [None, *ADAPTERS]])
    assert len({tuple(c.token_ids) for c in outs}) == len(outs)  # B != 0: every adapter differs from the base


def test_unloading_an_adapter_in_use_does_not_disturb_it(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs, max_batch_size=2)
    handle = engine.submit(Request(PROMPTS[3], adapter="r8dora", params=greedy(10)))
    other = engine.submit(Request(PROMPTS[1], adapter="r4", params=greedy(10)))
    engine.step()
    engine.step()
    engine.unload_adapter("r8dora")
    assert "r8dora" not in engine.adapters
    with pytest.raises(LorakitError, match="no adapter named 'r8dora'"):
        engine.submit(Request("x", adapter="r8dora"))
    expected = reference_tokens(tiny_model_dir, adapter_dirs["r8dora"], engine.prompt_ids(PROMPTS[3]), 10)
    assert handle.result().token_ids == expected
    assert other.result().finish_reason == "length"
    engine.load_adapter("r8dora", adapter_dirs["r8dora"])  # the name is free again
    assert engine.generate([Request(PROMPTS[3], adapter="r8dora", params=greedy(10))])[0].token_ids == expected


def test_a_bad_adapter_is_refused_and_nothing_changes(tiny_model_dir, smollm_tokenizer, adapter_dirs, tmp_path):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, {"r4": adapter_dirs["r4"]})
    before = engine.generate([Request(PROMPTS[0], adapter="r4", params=greedy(6))])[0].token_ids
    corrupt = tmp_path / "corrupt"
    shutil.copytree(adapter_dirs["r4"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LorakitError, match="truncated or corrupt"):
        engine.load_adapter("corrupt", corrupt)
    with pytest.raises(LorakitError, match="not found"):
        engine.load_adapter("missing", tmp_path / "nowhere")
    with pytest.raises(LorakitError, match="already loaded"):
        engine.load_adapter("r4", adapter_dirs["patterns"])
    assert engine.adapters == ["r4"]
    assert engine.generate([Request(PROMPTS[0], adapter="r4", params=greedy(6))])[0].token_ids == before


def test_adapter_memory_is_bounded_and_dropped_adapters_reload(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs, max_loaded_adapters=1, max_batch_size=2)
    assert len(engine.store.loaded) == 1 and len(engine.adapters) == len(ADAPTERS)
    names = ["r4", "patterns", "r4", "r8dora", "peft", "r4"]
    requests = [Request(PROMPTS[i % 4], adapter=a, params=greedy(5)) for i, a in enumerate(names)]
    for request, completion in zip(requests, engine.generate(requests)):
        expected = reference_tokens(tiny_model_dir, adapter_dirs[request.adapter], engine.prompt_ids(request.prompt), 5)
        assert completion.token_ids == expected
    assert len(engine.store.loaded) == 1 and list(engine.store.loaded) == ["r4"]  # the last one used


def test_max_tokens_and_stop_strings(tiny_model_dir, smollm_tokenizer):
    engine = make_engine(tiny_model_dir, smollm_tokenizer)
    full = engine.generate([Request(PROMPTS[0], params=greedy(12))])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    assert full.text == smollm_tokenizer.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    cut = engine.generate([Request(PROMPTS[0], params=greedy(12, stop=("never there", stop)))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 12


def test_stop_tokens_end_the_request(tiny_model_dir, smollm_tokenizer):
    engine = make_engine(tiny_model_dir, smollm_tokenizer)
    full = engine.generate([Request(PROMPTS[1], params=greedy(8))])[0]
    engine.stop_ids.add(full.token_ids[3])  # as if the model emitted its end-of-turn token there
    first = full.token_ids.index(full.token_ids[3])
    out = engine.generate([Request(PROMPTS[1], params=SamplingParams(max_tokens=8))])[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:first + 1]
    assert out.text == smollm_tokenizer.decode(full.token_ids[:first], skip_special_tokens=True)


def test_the_same_seed_gives_the_same_text_whatever_shares_the_batch(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs, max_batch_size=4)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = engine.generate([Request(PROMPTS[2], adapter="r4", params=params)])[0]
    company = [Request(PROMPTS[i], adapter=a, params=SamplingParams(max_tokens=9, temperature=0.8, seed=i))
               for i, a in enumerate([None, "peft", "r4"])]
    together = engine.generate([*company, Request(PROMPTS[2], adapter="r4", params=params)])[-1]
    assert together.token_ids == alone.token_ids and together.text == alone.text
    other_seed = engine.generate([Request(PROMPTS[2], adapter="r4", params=SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=8, ignore_eos=True))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_chat_messages_use_the_chat_template(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"}]
    expected_ids = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
    assert engine.prompt_ids(messages) == list(expected_ids)
    assert smollm_tokenizer.decode(expected_ids).endswith("<|im_start|>assistant\n")
    out = engine.generate([Request(messages, adapter="r4", params=greedy(6))])[0]
    assert out.token_ids == reference_tokens(tiny_model_dir, adapter_dirs["r4"], list(expected_ids), 6)


def test_streamed_deltas_add_up_to_the_completion(tiny_model_dir, smollm_tokenizer):
    engine = make_engine(tiny_model_dir, smollm_tokenizer)
    handle = engine.submit(Request(PROMPTS[3], params=greedy(10)))
    deltas = list(handle)
    assert [d.finish_reason for d in deltas] == [None] * 9 + ["length"]
    assert sum((d.token_ids for d in deltas), []) == handle.result().token_ids
    assert "".join(d.text for d in deltas) == handle.result().text
    assert handle.result().ttft_s <= handle.result().total_s


def test_async_streams_with_the_engine_thread(tiny_model_dir, smollm_tokenizer, adapter_dirs):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, adapter_dirs)

    async def collect(adapter):
        handle = engine.submit(Request(PROMPTS[0], adapter=adapter, params=greedy(6)))
        return [d async for d in handle], handle.result()

    async def main():
        return await asyncio.gather(*(collect(a) for a in (None, "r4", "peft")))

    with engine:
        results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    for deltas, completion in results:
        assert sum((d.token_ids for d in deltas), []) == completion.token_ids and len(completion.token_ids) == 6
    assert not engine.running


def test_cancel_frees_the_row(tiny_model_dir, smollm_tokenizer):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, max_batch_size=1)
    first = engine.submit(Request(PROMPTS[0], params=greedy(50)))
    second = engine.submit(Request(PROMPTS[1], params=greedy(3)))
    engine.step()
    first.cancel()
    assert second.result().finish_reason == "length"
    assert first.result().finish_reason == "abort" and len(first.result().token_ids) < 50
    assert not engine.rows


def test_requests_that_cannot_be_served_are_refused(tiny_model_dir, smollm_tokenizer):
    engine = make_engine(tiny_model_dir, smollm_tokenizer, max_queued=1)
    with pytest.raises(LorakitError, match="over the engine's max_seq_len"):
        engine.submit(Request(PROMPTS[0], params=SamplingParams(max_tokens=95)))
    with pytest.raises(LorakitError, match="no adapter named"):
        engine.submit(Request(PROMPTS[0], adapter="nope"))
    with pytest.raises(LorakitError, match="empty"):
        engine.submit(Request([]))
    with pytest.raises(LorakitError, match="vocabulary|lie in"):
        engine.submit(Request([10 ** 9]))
    with pytest.raises(LorakitError, match="top_p"):
        SamplingParams(top_p=0)
    engine.submit(Request(PROMPTS[0]))
    with pytest.raises(LorakitError, match="queue is full"):
        engine.submit(Request(PROMPTS[0]))


def test_the_engine_refuses_models_it_cannot_run(smollm_tokenizer):
    from conftest import tiny_gpt2

    with pytest.raises(LorakitError, match="Llama-family"):
        Engine(tiny_gpt2(), smollm_tokenizer)

