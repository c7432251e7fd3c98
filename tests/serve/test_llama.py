"""The engine's forward pass equals the model's own: prefill logits, then decoding logits with the static cache,
for Llama (grouped-query heads) and Qwen2 (q/k/v biases); models it cannot run exactly are refused."""
from __future__ import annotations

import pytest
import torch

from serve_fixtures import tiny

from lorakit import LorakitError
from lorakit.serve.llama import LlamaRunner
from lorakit.serve.step_batch import StepBatch
from lorakit.serve.weights import usable_layouts

# every layout the engine may choose in fp32 on this machine; packed where this torch has oneDNN (gemv and tiles
# are bf16's)
USABLE = usable_layouts(torch.float32, torch.device("cpu"))


def as_batch(tokens, positions, n_decode, prefills, logit_rows):
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return StepBatch(t(tokens), t(positions), n_decode, prefills, t(logit_rows), None)


@pytest.mark.parametrize("layout", USABLE)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@torch.no_grad()
def test_prefill_then_decode_equals_the_models_forward(kind, layout):
    model = tiny(kind)
    seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 12)]
    expected = [model(s[None]).logits[0] for s in seqs]  # before the runner re-lays the weights
    runner = LlamaRunner(model, max_rows=3, max_seq_len=16, layout=layout)
    assert runner.weight_layout == layout
    prompt = [s[:-2] for s in seqs]  # prefill all but 2 tokens of each sequence, then decode those two
    starts = [0, len(prompt[0]), len(prompt[0]) + len(prompt[1])]
    logits = runner.forward(as_batch(torch.cat(prompt).tolist(), sum((list(range(len(p))) for p in prompt), []), 0,
                                     [(slot, start, len(p)) for slot, (start, p) in enumerate(zip(starts, prompt))],
                                     [s + len(p) - 1 for s, p in zip(starts, prompt)]))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i], expected[i][len(s) - 3], rtol=1e-4, atol=1e-5)
    for back in (2, 1):
        step = runner.forward(as_batch([s[-back].item() for s in seqs], [len(s) - back for s in seqs], 3, [], [0, 1, 2]))
        for i, s in enumerate(seqs):
            torch.testing.assert_close(step[i], expected[i][len(s) - back], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", USABLE)
@pytest.mark.parametrize("tied", [False, True])
def test_fusing_keeps_the_models_own_forward(tied, layout):
    model = tiny("llama", tie_word_embeddings=tied)
    ids = torch.randint(0, 64, (1, 7))
    before = model(ids).logits
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    runner = LlamaRunner(model, max_rows=1, max_seq_len=8, layout=layout)
    # the modules now hold (d_out, d_in) views of the fused weights (packed: their own): the same values, bit
    # for bit, and the same forward up to the summation order of a different GEMM kernel
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
    head = model.get_output_embeddings().weight
    assert (head is model.get_input_embeddings().weight) == tied
    fused = runner.layers[0].weights["qkv"]
    if layout == "packed":  # oneDNN's blocked copy (an opaque tensor) beside the modules' own weights
        assert fused.is_mkldnn and runner.head_weight.is_mkldnn
        return
    # the head (and a tied input embedding with it) and q/k/v are views of the runner's tensors, not copies
    assert head.untyped_storage().data_ptr() == runner.head_weight.untyped_storage().data_ptr()
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


def test_the_weight_layout_is_chosen_once_per_machine(tmp_path, monkeypatch):
    from lorakit.core import autotune

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path))
    autotune.forget_process_decisions()
    runner = LlamaRunner(tiny("llama"), max_rows=2, max_seq_len=8)
    assert runner.weight_layout in USABLE
    (entry, decision), = ((k, v) for k, v in autotune.decisions().items() if k.startswith("decode_layout["))
    assert decision["choice"] == runner.weight_layout and set(decision["seconds"]) == set(USABLE)
    assert "32x32" in entry and "b1+2 float32" in entry  # the o projection's shape; both batch sizes measured
    with pytest.raises(LorakitError, match="weight layout"):
        LlamaRunner(tiny("llama"), max_rows=1, max_seq_len=8, layout="diagonal")
    for bf16_only in ("gemv", "tiles"):
        with pytest.raises(LorakitError, match=f"'{bf16_only}' is not available for torch.float32"):
            LlamaRunner(tiny("llama"), max_rows=1, max_seq_len=8, layout=bf16_only)


def test_sliding_windows_are_exact_only_within_the_window():
    model = tiny("mistral", sliding_window=16)
    LlamaRunner(model, max_rows=1, max_seq_len=16)
    with pytest.raises(LorakitError, match="sliding-window"):
        LlamaRunner(tiny("mistral", sliding_window=16), max_rows=1, max_seq_len=32)


needs_gemv = pytest.mark.skipif("gemv" not in usable_layouts(torch.bfloat16, torch.device("cpu")),
                                reason="this CPU (or compiler) has no AVX-512 BF16: the gemv layout is not built here")


@needs_gemv
@pytest.mark.parametrize("rows,d_in", [(1, 64), (1, 40), (3, 72), (16, 32)])  # 40, 72: a tail past 32 lanes
def test_the_bf16_gemv_kernel_equals_an_fp32_product(rows, d_in):
    from lorakit.serve.lora_kernel import gemv_kernel

    g = torch.Generator().manual_seed(rows + d_in)
    x, W = torch.randn(rows, d_in, generator=g).bfloat16(), torch.randn(130, d_in, generator=g).bfloat16()
    out = torch.empty(rows, 130, dtype=torch.bfloat16)
    gemv_kernel()(x, W, out)
    torch.testing.assert_close(out, (x.float() @ W.float().T).bfloat16(), rtol=1e-2, atol=2e-2)


needs_tiles = pytest.mark.skipif("tiles" not in usable_layouts(torch.bfloat16, torch.device("cpu")),
                                 reason="this CPU (or compiler) has no AVX-512 BF16: the tiles layout is not built here")


@needs_tiles
@pytest.mark.parametrize("rows", [1, 3, 9, 16, 17, 40])  # 9-16: blocks that prefetch; past 16: groups of 16 rows
@pytest.mark.parametrize("d_out,d_in", [(130, 64), (16, 3), (45, 71)])  # columns past a block of 16; odd inputs
def test_the_bf16_tiles_kernel_equals_an_fp32_product(rows, d_out, d_in):
    from lorakit.serve.lora_kernel import tiles_kernel

    product, tile = tiles_kernel()
    g = torch.Generator().manual_seed(rows + d_in)
    x, W = torch.randn(rows, d_in, generator=g).bfloat16(), torch.randn(d_out, d_in, generator=g).bfloat16()
    out = torch.full((rows, d_out), float("nan"), dtype=torch.bfloat16)  # every column written, none past them
    product(x, tile(W), out)
    torch.testing.assert_close(out, (x.float() @ W.float().T).bfloat16(), rtol=1e-2, atol=2e-2)


@needs_tiles
def test_a_tiled_copy_puts_sixteen_columns_pairs_side_by_side():
    from lorakit.serve.lora_kernel import tiles_kernel

    product, tile = tiles_kernel()
    W = torch.arange(20 * 5, dtype=torch.float32).view(20, 5).bfloat16()
    tiled = tile(W)
    assert tiled.shape == (2, 3, 16, 2)  # ceil(20 / 16) blocks of columns, ceil(5 / 2) pairs of inputs
    padded = torch.zeros(32, 6, dtype=torch.bfloat16)
    padded[:20, :5] = W
    for b, p, c, e in [(0, 0, 0, 1), (0, 2, 15, 0), (1, 1, 3, 1), (1, 2, 3, 1), (1, 0, 4, 0)]:
        assert tiled[b, p, c, e] == padded[16 * b + c, 2 * p + e]  # zero past W's edges
    with pytest.raises(RuntimeError, match="tiled copy"):
        product(torch.ones(1, 5, dtype=torch.bfloat16), W, torch.empty(1, 20, dtype=torch.bfloat16))


@needs_gemv
@pytest.mark.parametrize("layout", ["gemv", pytest.param("tiles", marks=needs_tiles)])
@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_the_compiled_layouts_decode_like_packed_in_bf16(layout, rows):
    seqs = [torch.randint(0, 64, (9,), generator=torch.Generator().manual_seed(i)) for i in range(rows)]
    logits = {}
    for held in ("packed", layout):
        model = tiny("llama").to(torch.bfloat16)
        runner = LlamaRunner(model, max_rows=rows, max_seq_len=16, layout=held, decode_step="torch")
        runner.forward(as_batch(torch.cat([s[:-1] for s in seqs]).tolist(), list(range(8)) * rows, 0,
                                [(i, 8 * i, 8) for i in range(rows)], [8 * i + 7 for i in range(rows)]))  # prefill
        logits[held] = runner.forward(as_batch([s[-1].item() for s in seqs], [8] * rows, rows, [],
                                               list(range(rows)))).float()
        if held == layout:  # the modules keep views of the rows beside the copy: no second copy of them
            q = model.model.layers[0].self_attn.q_proj.weight
            assert q.untyped_storage().data_ptr() == runner.layers[0].weights["qkv"][1].untyped_storage().data_ptr()
    torch.testing.assert_close(logits[layout], logits["packed"], rtol=2e-2, atol=3e-2)
