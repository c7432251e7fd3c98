"""A faster attention for bf16/fp16 training steps on CPU, registered with transformers' AttentionInterface.

On CPU, torch's fused scaled-dot-product kernel runs bf16 attention at a fraction of the GEMM rate: at
batch 4 x 256 tokens with SmolLM2's 9 heads, forward + backward takes ~15 ms a layer, a quarter of a LoRA
step. The same attention as three plain ops (scores = q k^T, softmax, probs v) runs on the bf16 GEMM
kernels and takes ~9 ms, at the price of keeping the (batch, heads, q_len, kv_len) probabilities for the
backward pass. So this path is taken only where it pays and the probabilities are small:

    CPU, bf16/fp16 inputs, more than one query token (training, prefill), no attention dropout, a mask
    that is None (causal) or boolean, and batch * heads * q_len * kv_len <= MAX_SCORES.

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

# Causal biases by (length, groups, dtype); batches padded to varying lengths would add one per length,
# so the cache is emptied when it holds more than _CACHE_SIZE.
_causal_bias_cache: dict[tuple, torch.Tensor] = {}
_CACHE_SIZE = 16


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


def _additive_bias(mask: torch.Tensor | None, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """0 where a query attends a key, the dtype's lowest value elsewhere; causal when mask is None."""
    lowest = torch.finfo(dtype).min
    if mask is None:
        def causal() -> torch.Tensor:
            allowed = torch.ones(q_len, q_len, dtype=torch.bool).tril()
            return torch.zeros(q_len, q_len, dtype=dtype).masked_fill(~allowed, lowest)

        return _cached((q_len, 1, dtype), causal)  # the same key as one group of _grouped_bias: the same tensor
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)


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
    # stacked along the query axis, (B, Hkv, g*Tq, D). Scaling k (Hkv heads) is cheaper than scaling q.
    q = query.reshape(batch, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, (key * scale).transpose(-1, -2))  # (B, Hkv, g*Tq, Tkv)
    # In place on the matmul's own output (not a view of it, which autograd would copy back in backward)
    scores.add_(_grouped_bias(attention_mask, kv_heads, groups, q_len, kv_len, scores.dtype))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, value)  # (B, Hkv, g*Tq, D)
    return out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


def _grouped_bias(mask: torch.Tensor | None, kv_heads: int, groups: int, q_len: int, kv_len: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The additive bias laid out as the stacked scores: (g*Tq, Tkv), or (B|1, Hkv|1, g*Tq, Tkv) for a mask."""
    bias = _additive_bias(mask, q_len, dtype)
    if bias.dim() == 2:  # causal, the same for every head: the g stacked heads repeat it
        return _cached((q_len, groups, dtype), lambda: bias.repeat(groups, 1))
    b, h = bias.shape[:2]
    if h == 1:  # one mask for all heads
        return bias.repeat(1, 1, groups, 1)
    return bias.reshape(b, kv_heads, groups * q_len, kv_len)  # per-head masks, in the heads' order


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

    shapes = f"b{batch} t{seq} h{heads}/{kv_heads} d{dim} {str(dtype).replace('torch.', '')}"
    return choose("cpu_attention", shapes, {"gemm": run(cpu_attention_forward), "sdpa": run(sdpa_attention_forward)})
