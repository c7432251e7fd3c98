"""A faster attention for bf16/fp16 training steps on CPU, registered with transformers' AttentionInterface.

On CPU, torch's fused scaled-dot-product kernel runs bf16 attention at a fraction of the GEMM rate: at
batch 4 x 256 tokens with SmolLM2's 9 heads, forward + backward takes ~15 ms a layer, a quarter of a LoRA
step. The same attention as three plain ops (scores = q k^T, softmax, probs v) runs on the bf16 GEMM
kernels and takes ~9 ms, at the price of keeping the (batch, heads, q_len, kv_len) probabilities for the
backward pass. So this path is taken only where it pays and the probabilities are small:

    CPU, bf16/fp16 inputs, more than one query token (training, prefill), no attention dropout, a mask
    that is None (causal) or boolean, and batch * heads * q_len * kv_len <= MAX_SCORES.

The queries go in blocks of QUERY_BLOCK, each over the keys up to its last query only: the scores above the
causal diagonal are never computed (after the softmax they are exact zeros): a quarter of the products and of
the kept probabilities at 256 tokens, and smaller products that stay in the caches (batch 4 x 256 on an AMD
EPYC Zen 4: 8 ms instead of 13 ms a layer, forward + backward). A block keeps every key where a given mask lets
one of its queries see a later key.

Everything else (CUDA, fp32, decoding one token at a time, long sequences) goes to transformers' own
"sdpa" function, unchanged. Masks are made as for "sdpa" (None where causal alone suffices, else boolean,
True = attend). Masked scores get the dtype's lowest finite value, as transformers' eager attention, so a
fully masked row (a padding query) gives finite output rather than NaN.
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "lorakit_cpu"
# Largest score matrix (elements over batch, heads, queries, keys) kept per layer: 8M elements = 16 MB in
# bf16, i.e. batch 4 x 9 heads x 480 tokens; beyond it the fused kernel's lower memory wins.
MAX_SCORES = 1 << 23
# Queries per block (above): 128 ran fastest of 32-192 at 128-480 tokens on an AMD EPYC Zen 4.
QUERY_BLOCK = 128

# Causal biases by (block, groups, dtype); batches padded to varying lengths would add some per length,
# so the cache is emptied when it holds more than _CACHE_SIZE.
_causal_bias_cache: dict[tuple, torch.Tensor] = {}
_CACHE_SIZE = 64


def _cached(key: tuple, make) -> torch.Tensor:
    if key not in _causal_bias_cache:
        if len(_causal_bias_cache) >= _CACHE_SIZE:
            _causal_bias_cache.clear()
        _causal_bias_cache[key] = make()
    return _causal_bias_cache[key]


def _takes_fast_path(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float,
                     kwargs: dict) -> bool:
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    return (query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and q_len > 1
            and dropout == 0.0 and (mask is None and q_len == kv_len or mask is not None and mask.dtype == torch.bool)
            and batch * heads * q_len * kv_len <= MAX_SCORES
            and kwargs.get("position_bias") is None and kwargs.get("softcap") is None and kwargs.get("s_aux") is None
            and not kwargs.get("output_attentions", False))


def _causal_bias(start: int, stop: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Queries [start, stop) over keys [0, stop): 0 where a query attends a key, the dtype's lowest value above
    the diagonal, repeated for the g query heads stacked along the query axis: (g * (stop - start), stop)."""
    def make() -> torch.Tensor:
        later = torch.arange(stop)[None, :] > torch.arange(start, stop)[:, None]
        return torch.zeros(stop - start, stop, dtype=dtype).masked_fill(later, torch.finfo(dtype).min).repeat(groups, 1)

    return _cached((start, stop, groups, dtype), make)


def _mask_bias(mask: torch.Tensor, kv_heads: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (B|1, H|1, Tq, Tkv), True = attend, as an additive bias laid out as the stacked scores,
    (B|1, Hkv|1, g, Tq, Tkv): 0 where a query attends a key, the dtype's lowest value elsewhere."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    b, h, q_len, kv_len = bias.shape
    if h == 1:  # one mask for all heads
        return bias.unsqueeze(2).expand(b, 1, groups, q_len, kv_len)
    return bias.view(b, kv_heads, groups, q_len, kv_len)  # per-head masks, in the heads' order


def query_blocks(mask: torch.Tensor | None, q_len: int, kv_len: int) -> list[tuple[int, int, int]]:
    """(start, stop, keys) per block of queries: queries [start, stop) attend keys [0, keys), the keys up to the
    block's last query (the kv_len - q_len prefix keys included), or all keys where the mask lets a query of
    the block see a later one. A compiled caller with a mask gets one block of all keys (reading the mask would
    break its graph)."""
    if mask is not None and torch.compiler.is_compiling():
        return [(0, q_len, kv_len)]
    blocks = []
    for start in range(0, q_len, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q_len)
        keys = kv_len - q_len + stop
        if mask is not None and keys < kv_len and bool(mask[..., start:stop, keys:].any()):
            keys = kv_len
        blocks.append((start, stop, keys))
    return blocks


def kept_probabilities(seq: int) -> int:
    """Attention probabilities one head keeps for a causal sequence of `seq` tokens (queries x keys, all blocks)."""
    return sum((stop - start) * keys for start, stop, keys in query_blocks(None, seq, seq))


def cpu_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q (B, H, Tq, D), k/v (B, Hkv, Tkv, D) -> (B, Tq, H, D)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not _takes_fast_path(query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    # Grouped-query attention without repeating k and v: the g query heads that share a key/value head are
    # stacked along the query axis of each block, (B, Hkv, g * rows, D). Scaling k (Hkv heads) is cheaper than
    # scaling q; k and v are made contiguous once, not copied by each block's product.
    q = query.unflatten(1, (kv_heads, groups))  # (B, Hkv, g, Tq, D), a view
    keys_t = (key * scale).contiguous().transpose(-1, -2)  # (B, Hkv, D, Tkv)
    value = value.contiguous()
    bias = None if attention_mask is None else _mask_bias(attention_mask, kv_heads, groups, query.dtype)
    outs = []
    for start, stop, keys in query_blocks(attention_mask, q_len, kv_len):
        rows = groups * (stop - start)
        scores = torch.matmul(q[:, :, :, start:stop].reshape(batch, kv_heads, rows, dim), keys_t[..., :keys])
        # In place on the matmul's own output (not a view of it, which autograd would copy back in backward)
        if bias is None:
            scores.add_(_causal_bias(start, stop, groups, scores.dtype))
        else:
            scores.add_(bias[:, :, :, start:stop, :keys].reshape(bias.shape[0], bias.shape[1], rows, keys))
        probs = torch.softmax(scores, dim=-1)
        outs.append(torch.matmul(probs, value[:, :, :keys]).view(batch, kv_heads, groups, stop - start, dim))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=3)  # (B, Hkv, g, Tq, D)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make NAME known to transformers (attention and mask functions); idempotent. Returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, cpu_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def use_fast_cpu_attention(model: nn.Module, measure: bool = True) -> bool:
    """Switch a transformers model that uses "sdpa" to NAME (which falls back to sdpa off its fast path),
    where NAME is the faster of the two on this machine for the model's attention shapes (measured once
    and cached: `lorakit.core.autotune`). bf16/fp16 models only; others are left on "sdpa".

    Args:
        measure: False switches without measuring (a model bound for a GPU, where the fast path never runs).

    Returns:
        Whether the model was switched; models on other implementations are left alone.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    dtype = next(model.parameters()).dtype
    if measure and dtype in (torch.bfloat16, torch.float16) and choose_attention(config, dtype) != "gemm":
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):  # an architecture that does not dispatch through AttentionInterface
        return False
    return model.config._attn_implementation == NAME


def choose_attention(config, dtype: torch.dtype, batch: int = 4, seq: int = 256) -> str:
    """"gemm" (this module's path) or "sdpa", whichever runs a layer's attention forward + backward faster
    on this CPU at a training step's shapes (batch x seq tokens, the model's heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.core.autotune import choose

    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=g).to(dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    module = nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, heads // kv_heads, True

    def run(forward):
        def step():
            with torch.enable_grad():
                out, _ = forward(module, q, k, v, None, dropout=0.0, scaling=dim ** -0.5)
                out.sum().backward()
        return step

    shapes = f"b{batch} t{seq} h{heads}/{kv_heads} d{dim} {str(dtype).replace('torch.', '')} q-block {QUERY_BLOCK}"
    return choose("cpu_attention", shapes, {"gemm": run(cpu_attention_forward), "sdpa": run(sdpa_attention_forward)})
