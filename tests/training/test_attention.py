"""lorakit's CPU attention (lorakit.attention) against transformers' "sdpa" and an fp64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

from lorakit.training import attention
from lorakit.training.attention import (
    NAME,
    cpu_attention_forward,
    use_fast_cpu_attention,
)


def _pair(dtype=torch.bfloat16):
    ref = tiny_llama().to(dtype)
    ref.set_attn_implementation("sdpa")
    fast = copy.deepcopy(ref)
    assert use_fast_cpu_attention(fast, measure=False) and fast.config._attn_implementation == NAME
    return ref, fast


def _padded_batch():
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    mask[2, 15:] = 0  # right padding
    return ids, mask


class _Module(torch.nn.Module):
    num_key_value_groups = 2


MASKS = ["causal", "one mask for all heads", "a mask per head", "prefix keys", "a query sees later keys"]


def _mask(masked: str, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor | None:
    """A boolean mask (True = attend) of each kind; every query sees itself, so no row of the reference is empty."""
    if masked == "causal":
        return None
    keep = torch.ones(batch, kv_len, dtype=torch.bool)
    keep[0, :5] = False  # left padding
    prefix = kv_len - q_len
    causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(prefix)
    mask = causal[None, None] & keep[:, None, None, :]
    if masked == "a mask per head":  # each head also hides a different key
        mask = mask.repeat(1, heads, 1, 1)
        for head in range(heads):
            mask[:, head, :, 6 + head] = False
    if masked == "a query sees later keys":  # e.g. a bidirectional span: the blocks must keep every key
        mask[:, :, 3, :] = True
    itself = torch.ones(q_len, kv_len, dtype=torch.bool).tril(prefix) & ~torch.ones(q_len, kv_len, dtype=torch.bool).tril(prefix - 1)
    return mask | itself


@pytest.mark.parametrize("query_block", [8, 128], ids=["blocks of 8", "one block"])
@pytest.mark.parametrize("masked", MASKS)
def test_fast_path_is_as_close_to_fp64_as_sdpa(masked, query_block, monkeypatch):
    # q (B, H, T, D) with 2 query heads per key/value head, causal or with a mask; 24 queries in 3 blocks of 8
    # (each over the keys up to its last query) or in one
    monkeypatch.setattr(attention, "QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    q_len, kv_len = 24, 29 if masked == "prefix keys" else 24
    q = torch.randn(2, 4, q_len, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, kv_len, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = _mask(masked, 2, 4, q_len, kv_len)
    grad_out = torch.randn(2, q_len, 4, 16, dtype=torch.float64)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask,
                                              is_causal=mask is None).transpose(1, 2)

    def with_grads(run, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = run(*inputs)
        out.backward(grad_out.to(out.dtype))
        return [out.double()] + [t.grad.double() for t in inputs]

    bf = [t.detach().to(torch.bfloat16) for t in (q, k, v)]
    exact = with_grads(sdpa, q, k, v)
    fast = with_grads(lambda *t: cpu_attention_forward(_Module(), *t, mask, scaling=16 ** -0.5)[0], *bf)
    reference = with_grads(sdpa, *bf)
    assert fast[0].shape == exact[0].shape
    for name, e, f, r in zip(["out", "dq", "dk", "dv"], exact, fast, reference):
        err_fast, err_sdpa = (f - e).abs().max().item(), (r - e).abs().max().item()
        assert err_fast <= 2 * err_sdpa + 2e-3, (name, err_fast, err_sdpa)


def test_query_blocks_skip_only_keys_no_query_of_the_block_sees(monkeypatch):
    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    assert attention.query_blocks(None, 20, 20) == [(0, 8, 8), (8, 16, 16), (16, 20, 20)]
    assert attention.query_blocks(None, 20, 25) == [(0, 8, 13), (8, 16, 21), (16, 20, 25)]  # 5 prefix keys
    mask = torch.ones(20, 20, dtype=torch.bool).tril()[None, None]
    assert attention.query_blocks(mask, 20, 20) == [(0, 8, 8), (8, 16, 16), (16, 20, 20)]
    mask[..., 9, 17] = True  # query 9 sees key 17: its block keeps every key
    assert attention.query_blocks(mask, 20, 20) == [(0, 8, 8), (8, 16, 20), (16, 20, 20)]
    assert attention.kept_probabilities(20) == 8 * 8 + 8 * 16 + 4 * 20


def test_model_logits_and_gradients_match_sdpa_in_bf16():
    ref, fast = _pair()
    ids, mask = _padded_batch()
    keep = mask.bool()
    for m in (None, mask):
        a, b = ref(ids, attention_mask=m).logits.float(), fast(ids, attention_mask=m).logits.float()
        rows = keep if m is not None else torch.ones_like(keep)
        assert torch.isfinite(b).all()
        assert (a - b)[rows].abs().max() <= 0.02 * a.abs().max()
    grads = []
    for model in (ref, fast):
        x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, attention_mask=mask).logits.float()[keep].square().mean().backward()
        grads.append(x.grad.float())
    assert (grads[0] - grads[1]).abs().max() <= 0.03 * grads[0].abs().max()


def test_outside_the_fast_path_it_is_sdpa_exactly():
    # fp32 weights, and one-token decoding steps, go to transformers' sdpa function unchanged
    ref, fast = _pair(torch.float32)
    ids, mask = _padded_batch()
    assert torch.equal(ref(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits)
    ref, fast = _pair(torch.bfloat16)
    prompt = ids[:1, :8]
    assert torch.equal(ref.generate(prompt, max_new_tokens=10, do_sample=False),
                       fast.generate(prompt, max_new_tokens=10, do_sample=False))


def test_only_sdpa_models_are_switched():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_fast_cpu_attention(model)
    assert model.config._attn_implementation == "eager"


def test_prefix_keys_longer_than_queries_take_the_fast_path_correctly():
    # prefix tuning puts P cached keys ahead of the queries: kv_len > q_len, a boolean mask
    from lorakit.methods import prefix

    ref = tiny_llama().to(torch.bfloat16)
    ref.set_attn_implementation("sdpa")
    prefix.apply(ref, prefix.PrefixConfig(num_virtual_tokens=5, init="random"))
    fast = copy.deepcopy(ref)
    assert use_fast_cpu_attention(fast, measure=False)
    ids, mask = _padded_batch()
    a, b = ref(ids, attention_mask=mask).logits.float(), fast(ids, attention_mask=mask).logits.float()
    assert torch.isfinite(b).all()
    assert (a - b)[mask.bool()].abs().max() <= 0.02 * a.abs().max()


def test_causal_bias_cache_stays_bounded():
    # batches padded to many different lengths must not grow the cache without end
    for length in range(2, 200):
        bias = attention._causal_bias(0, length, 1, torch.bfloat16)
        assert bias.shape == (length, length) and bias[0, 1] < -1e30 and bias[1, 0] == 0
    block = attention._causal_bias(4, 8, 2, torch.bfloat16)  # queries 4..7, keys 0..7, 2 stacked heads
    assert block.shape == (8, 8) and torch.equal(block[:4], block[4:])
    assert block[0, 4] == 0 and block[0, 5] < -1e30 and block[3, 7] == 0
    assert len(attention._causal_bias_cache) <= attention._CACHE_SIZE


@pytest.mark.parametrize("masked", ["causal", "one mask for all heads"])
def test_the_fast_path_compiles_into_one_graph(masked):
    # the decoder layers run compiled in training (--compile): the blocks must not break the layer's graph
    torch._dynamo.reset()
    q = torch.randn(2, 4, 160, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 160, 16, dtype=torch.bfloat16) for _ in range(2))
    mask = _mask(masked, 2, 4, 160, 160)
    explained = torch._dynamo.explain(cpu_attention_forward)(_Module(), q, k, v, mask, scaling=0.25)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(cpu_attention_forward)(_Module(), q, k, v, mask, scaling=0.25)[0]
    torch.testing.assert_close(compiled, cpu_attention_forward(_Module(), q, k, v, mask, scaling=0.25)[0],
                               rtol=2e-2, atol=2e-2)
