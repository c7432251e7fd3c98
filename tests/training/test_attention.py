"""lorakit's CPU attention (lorakit.attention) against transformers' "sdpa" and an fp64 reference."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

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


@pytest.mark.parametrize("masked", ["causal", "one mask for all heads", "a mask per head"])
def test_fast_path_is_as_close_to_fp64_as_sdpa(masked):
    # q (B, H, T, D) with 2 query heads per key/value head, causal or with a padding mask
    torch.manual_seed(0)
    q = torch.randn(2, 4, 24, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, 24, 16, dtype=torch.float64), torch.randn(2, 2, 24, 16, dtype=torch.float64)
    mask = None
    if masked != "causal":
        keep = torch.ones(2, 24, dtype=torch.bool)
        keep[0, :5] = False
        mask = torch.ones(24, 24, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
        if masked == "a mask per head":  # each head also hides a different key
            mask = mask.repeat(1, 4, 1, 1)
            for head in range(4):
                mask[:, head, :, 6 + head] = False
        mask = mask | torch.eye(24, dtype=torch.bool)  # every query sees itself: no empty row in the reference
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    exact = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=mask is None).transpose(1, 2)
    bf = [t.to(torch.bfloat16) for t in (q, k, v)]
    fast, _ = cpu_attention_forward(_Module(), *bf, mask, scaling=16 ** -0.5)
    sdpa = F.scaled_dot_product_attention(bf[0], bf[1].repeat_interleave(2, 1), bf[2].repeat_interleave(2, 1),
                                          attn_mask=mask, is_causal=mask is None).transpose(1, 2)
    err_fast = (fast.double() - exact).abs().max().item()
    err_sdpa = (sdpa.double() - exact).abs().max().item()
    assert fast.shape == exact.shape
    assert err_fast <= 2 * err_sdpa + 1e-3, (err_fast, err_sdpa)


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
    from lorakit.training import attention

    for length in range(2, 40):
        bias = attention._additive_bias(None, length, torch.bfloat16)
        assert bias.shape == (length, length) and bias[0, 1] < -1e30 and bias[1, 0] == 0
    assert len(attention._causal_bias_cache) <= attention._CACHE_SIZE
