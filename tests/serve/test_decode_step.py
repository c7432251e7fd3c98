"""The compiled decoding step (lorakit.serve.decode_step) against the engine's torch path, both measured against
an fp32 forward of the same bf16-rounded weights: logits and cache writes for one row and several, in each layout
it reads (tiles: bf16_tiles at every row count; gemv: bf16_gemv for one row, oneDNN's packed product for more;
rows: bf16_gemv), grouped-query heads of sizes that take
each of its attention paths, Qwen2's biases, and every decoding step of a mixed batch of adapters (different
ranks, DoRA, a row on the base); the choice is refused with lorakit's error where it cannot run."""
from __future__ import annotations

import pytest
import torch
from serve_fixtures import ADAPTERS, adapter_dirs, base_model, tiny  # noqa: F401 (fixture)

from lorakit import LorakitError
from lorakit.serve import Engine, EngineConfig, Request, SamplingParams
from lorakit.serve.llama import LlamaRunner
from lorakit.serve.step_batch import StepBatch
from lorakit.serve.lora_kernel import step_kernel

needs_step = pytest.mark.skipif(step_kernel() is None, reason="this CPU (or compiler) has no AVX-512 BF16: the "
                                                              "compiled step is not built here")
SEQS = (9, 5, 12)  # the rows' lengths: each row attends over its own span of the cache


def tiny_bf16(kind: str, head_dim: int, dtype: torch.dtype):
    """serve_fixtures.tiny with heads of `head_dim`, in bf16 (or `dtype`: an fp32 reference holds the same
    bf16-rounded weights)."""
    model = tiny(kind, hidden_size=4 * head_dim, intermediate_size=6 * head_dim, initializer_range=0.1)
    return model.to(torch.bfloat16).to(dtype)


def batch(tokens, positions, n_decode, prefills, logit_rows, lora=None) -> StepBatch:
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return StepBatch(t(tokens), t(positions), n_decode, prefills, t(logit_rows), lora)


def prefill_all(runner: LlamaRunner, seqs: list[torch.Tensor], rows: int) -> None:
    """Prefill all but the last two tokens of the first `rows` sequences into slots 0..rows-1."""
    prompts = [s[:-2] for s in seqs[:rows]]
    starts = [sum(len(p) for p in prompts[:i]) for i in range(rows)]
    runner.forward(batch(torch.cat(prompts).tolist(), sum((list(range(len(p))) for p in prompts), []), 0,
                         [(slot, start, len(p)) for slot, (start, p) in enumerate(zip(starts, prompts))],
                         [s + len(p) - 1 for s, p in zip(starts, prompts)]))


def both_paths(runner: LlamaRunner, step: StepBatch, forward=None):
    """(torch path's logits, compiled logits, their cache writes' largest difference relative to the largest value
    written), from the same cache. forward: the runner's own (default: runner.forward)."""
    forward = forward or runner.forward
    compiled, keys, values = runner.compiled_step, runner.cache.k.clone(), runner.cache.v.clone()
    assert compiled is not None and compiled.takes(step)
    runner.compiled_step = None
    expected = forward(step).float()
    written = runner.cache.k.clone(), runner.cache.v.clone()
    runner.cache.k.copy_(keys)
    runner.cache.v.copy_(values)
    runner.compiled_step = compiled
    got = forward(step).float()
    cache_diff = max((runner.cache.k.float() - written[0].float()).abs().max().item() / written[0].abs().max().item(),
                     (runner.cache.v.float() - written[1].float()).abs().max().item() / written[1].abs().max().item())
    return expected, got, cache_diff


@needs_step
@pytest.mark.parametrize("rows,layout", [(1, "tiles"), (3, "tiles"), (1, "gemv"), (3, "gemv"), (3, "rows")])
@pytest.mark.parametrize("head_dim", [8, 48, 64])  # scalar scores and values; scalar scores; bf16 dot products
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_the_compiled_step_is_as_close_to_fp32_as_the_torch_path(kind, head_dim, rows, layout):
    seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in SEQS]
    runner = LlamaRunner(tiny_bf16(kind, head_dim, torch.bfloat16), max_rows=3, max_seq_len=16, layout=layout,
                         decode_step="compiled")
    reference = LlamaRunner(tiny_bf16(kind, head_dim, torch.float32), max_rows=3, max_seq_len=16, layout="rows")
    prefill_all(runner, seqs, rows)
    prefill_all(reference, seqs, rows)
    for back in (2, 1):
        step = lambda: batch([s[-back].item() for s in seqs[:rows]], [len(s) - back for s in seqs[:rows]], rows, [],
                             list(range(rows)))  # noqa: E731
        expected, got, cache_diff = both_paths(runner, step())
        exact = reference.forward(step())
        scale = exact.abs().max().item()
        torch_error, compiled_error = (expected - exact).abs().max().item(), (got - exact).abs().max().item()
        assert compiled_error <= 1.5 * torch_error + 0.01 * scale, (compiled_error, torch_error)
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.03 * scale)
        assert cache_diff <= 0.01  # the rotated keys and the values it wrote: the torch path's, to bf16 rounding
        assert got.argmax(-1).tolist() == exact.argmax(-1).tolist()


@needs_step
@torch.no_grad()
@pytest.mark.parametrize("layout", ["tiles", "gemv"])
@pytest.mark.parametrize("names", [[*ADAPTERS, None, "r4"], ["r8dora"] * 3, ["r8dora", None], ["patterns"]],
                         ids=["mixed", "one-adapter", "one-row-and-base", "one-row"])
def test_every_step_of_a_mixed_batch_of_adapters_matches_the_torch_path(tiny_model_dir, smollm_tokenizer, adapter_dirs,
                                                                         names, layout):
    """mixed: different ranks, per-module ranks, rsLoRA, DoRA (lorakit's and PEFT's), the base, two rows on one
    adapter (one block of the kernel); one-adapter: every row on one DoRA adapter (its columns split between the
    threads); one-row(-and-base): a single adapted row (the update in the product's own pass), DoRA beside a row on
    the base, and an adapter that leaves some projections alone (batch-1 decoding)."""
    engine = Engine(base_model(tiny_model_dir, torch.bfloat16), smollm_tokenizer,
                    EngineConfig(max_seq_len=96, max_batch_size=6, lora_strategy="fused", prefill="separate",
                                 decode_step="compiled", weight_layout=layout))
    for name, directory in adapter_dirs.items():
        engine.load_adapter(name, directory)
    assert engine.decode_step == "compiled"
    runner, forward, compared = engine.runner, engine.runner.forward, []

    def checked_forward(step: StepBatch) -> torch.Tensor:
        if step.prefills:
            return forward(step)
        expected, got, cache_diff = both_paths(runner, step, forward)
        compared.append((step.lora is not None, step.n_decode))
        scale = expected.abs().max().item()
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.03 * scale)
        assert cache_diff <= 0.01
        return got.to(torch.bfloat16)

    runner.forward = checked_forward
    engine.generate([Request(f"Request {i} reads", adapter=name, params=SamplingParams(max_tokens=5, ignore_eos=True))
                     for i, name in enumerate(names)])
    assert (True, len(names)) in compared  # a step with every row decoding


def test_the_compiled_step_is_refused_where_it_cannot_run():
    with pytest.raises(LorakitError, match="runs bf16 models on the CPU"):
        LlamaRunner(tiny_bf16("llama", 8, torch.float32), max_rows=1, max_seq_len=8, decode_step="compiled")
    with pytest.raises(LorakitError, match="decode_step='fast' is invalid"):
        EngineConfig(decode_step="fast")
    assert LlamaRunner(tiny_bf16("llama", 8, torch.bfloat16), max_rows=1, max_seq_len=8, decode_step="torch").compiled_step is None
    assert LlamaRunner(tiny_bf16("llama", 8, torch.float32), max_rows=1, max_seq_len=8).compiled_step is None  # auto: torch


@needs_step
def test_the_compiled_step_reads_the_weights_rows():
    with pytest.raises(LorakitError, match="weight_layout 'transposed' holds none"):
        LlamaRunner(tiny_bf16("llama", 8, torch.bfloat16), max_rows=1, max_seq_len=8, layout="transposed",
                    decode_step="compiled")


@needs_step
@pytest.mark.parametrize("head_dim,heads,kv_heads,length", [(64, 9, 3, 37), (32, 4, 4, 20), (8, 4, 2, 17), (64, 8, 1, 1)])
def test_the_compiled_prefill_attention_is_as_close_to_fp32_as_sdpa(head_dim, heads, kv_heads, length):
    from lorakit.serve.lora_kernel import prefill_attention_kernel

    g = torch.Generator().manual_seed(length)
    # q as the runner passes it: a view of the rotated q/k rows, heads contiguous, rows wider than the heads
    q = torch.randn(length, heads + kv_heads, head_dim, generator=g).bfloat16()[:, :heads]
    keys, values = (torch.randn(kv_heads, 48, head_dim, generator=g).bfloat16() for _ in range(2))
    scale = head_dim ** -0.5

    def sdpa(dtype):
        return torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype).transpose(0, 1)[None], keys[None, :, :length].to(dtype), values[None, :, :length].to(dtype),
            is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1).reshape(length, -1).float()

    got = prefill_attention_kernel()(q, keys, values, length, scale).float()
    exact, rounded = sdpa(torch.float32), sdpa(torch.bfloat16)
    assert (got - exact).abs().max() <= 1.5 * (rounded - exact).abs().max() + 1e-3
    with pytest.raises(RuntimeError, match="keys and values are"):
        prefill_attention_kernel()(q, keys.float(), values, length, scale)
