"""The engine's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2): the model's weights,
norms and rotary embedding, a static KV cache, and one step that decodes the running rows and prefills
new prompts together.

What makes it lean, next to transformers' `generate`: q/k/v and gate/up each run as one GEMM (their
weights are laid side by side in one tensor, the modules keep views of it, so no memory is added); every
weight, the head's too, is held in the layout whose products run fastest on this machine
(`lorakit.serve.weights`: transposed for a GEMM, nn.Linear's rows, or oneDNN's packed layout); the
rotary cos/sin of every position are computed once; the cache is preallocated and written in place; the
output head runs only at the positions that are sampled; no per-step mask or cache objects are built.

One step's tokens are packed: first one token per decoding row (rows 0..n-1 of the cache, in slot order),
then every new prompt whole. Decoding rows attend together over the cache; each prompt attends causally
over itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.errors import LorakitError
from lorakit.core.layers import LoraLayer
from lorakit.serve.adapters import GroupLayout
from lorakit.serve.decode_step import compiled_step, why_not_compiled
from lorakit.serve.kv_cache import KVCache
from lorakit.serve.lora_kernel import prefill_attention_kernel
from lorakit.serve.multi_lora import LoraBatch
from lorakit.serve.step_batch import StepBatch
from lorakit.serve.weights import LAYOUTS, choose_layout, hold, product, rows_of, usable_layouts

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# group name -> (parent module, projections whose outputs it concatenates)
GROUPS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
# rope types whose frequencies do not depend on the sequence length, so one table serves every step
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


# RMSNorm classes computing weight * (x / rms(x)) with the normalization in fp32, as Llama's does
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def rms_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's RMSNorm in three kernels (normalize in fp32, round to the input dtype, scale), the same
    sequence of roundings as transformers' seven; other norm classes are called as they are."""
    if type(module).__name__ not in _RMS_NORMS:
        return module
    weight, eps = module.weight, module.variance_epsilon

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight
    return norm


@dataclass
class _Layer:
    input_norm: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    act: nn.Module
    weights: dict[str, torch.Tensor]  # group -> fused, held in the runner's layout
    biases: dict[str, torch.Tensor | None]


def check_supported(model: nn.Module, max_seq_len: int) -> None:
    """Raise LorakitError unless the engine's forward pass can run `model` exactly."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    if kind not in LLAMA_FAMILY or not hasattr(getattr(model, "model", None), "layers"):
        raise LorakitError(f"the serving engine runs Llama-family decoders ({', '.join(LLAMA_FAMILY)}); "
                           f"this model is {kind!r}. Use `lorakit generate` for other architectures.")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LorakitError("the engine needs the plain base model: load adapters with engine.load_adapter, "
                           "not lorakit.apply/load_adapter on the model.")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE:
        raise LorakitError(f"rope_type {rope!r} changes with the sequence length; the engine supports {_STATIC_ROPE}.")
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if (window is not None or layer_types != {"full_attention"}) and (window is None or max_seq_len > window):
        raise LorakitError(f"this model uses sliding-window attention (window {window}); the engine attends over "
                           f"the whole sequence, which is the same only up to the window: use max_seq_len <= {window}.")


class LlamaRunner:
    """Runs `StepBatch`es through a Llama-family model with a static KV cache.

    Args:
        model: the base model (plain transformers modules, eval mode). Its q/k/v and gate/up weights are
            re-laid into one tensor each, the modules keeping views of it (values unchanged).
        max_rows: requests in the cache at once.
        max_seq_len: tokens per request.
        layout: how the weights are held ("transposed", "rows", "packed", "gemv", "tiles"; lorakit.serve.weights),
            or "auto": tiles where the compiled step runs, else the fastest on this machine, measured once.
        decode_step: "auto" (steps that only decode run as one compiled call where it applies:
            lorakit.serve.decode_step), "compiled" (an error where it cannot) or "torch".

    Raises:
        LorakitError: the model is not one the runner supports (see `check_supported`).
    """

    def __init__(self, model: nn.Module, max_rows: int, max_seq_len: int, layout: str = "auto",
                 decode_step: str = "auto") -> None:
        check_supported(model, max_seq_len)
        config, inner = model.config, model.model
        weight = model.get_input_embeddings().weight
        self.model, self.dtype, self.device = model, weight.dtype, weight.device
        self.embed, self.norm = model.get_input_embeddings(), rms_norm(inner.norm)
        if layout == "auto" and decode_step != "torch" and not why_not_compiled(model, self.dtype, self.device, None) \
                and "tiles" in usable_layouts(self.dtype, self.device):
            # the compiled step's products at every row count, and prompts' too, run fastest over the tiled copy,
            # which costs no more memory than a packed one (README, Serving)
            layout = "tiles"
        elif layout == "auto":
            layout = choose_layout(self._shapes(model), self.dtype, self.device, max_rows)
        if layout not in LAYOUTS:
            raise LorakitError(f"weight layout {layout!r} is unknown: use auto or one of {', '.join(LAYOUTS)}.")
        if layout not in (usable := usable_layouts(self.dtype, self.device)):
            raise LorakitError(f"weight layout {layout!r} is not available for {self.dtype} on this machine: use auto "
                               f"or one of {', '.join(usable)}.")
        self.weight_layout, self._product = layout, product(layout)
        self.head_weight, self.head_bias = self._lay_head(model)
        attn = inner.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.scaling = attn.scaling
        self.layers = [self._fuse(layer) for layer in inner.layers]
        self.layout = [[self._group_layout(i, layer, g) for g in GROUPS] for i, layer in enumerate(inner.layers)]
        positions = torch.arange(max_seq_len, device=self.device)[None]
        cos, sin = inner.rotary_emb(weight[:1], positions)  # (1, max_seq_len, head_dim), in the model's dtype
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin: one roll instead of two slices, a negation and a cat
        self.cos, self.signed_sin = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        self.cache = KVCache(len(self.layers), max_rows, self.n_kv, max_seq_len, self.head_dim, self.dtype, self.device)
        self.compiled_step = compiled_step(self, model, decode_step)
        # new prompts' causal attention: compiled wherever the compiled step runs and its scores take bf16 dot
        # products (head_dim a multiple of 32): 2x sdpa's CPU kernel on prompts of 144 tokens (README, Serving)
        self._prefill_attention = prefill_attention_kernel() \
            if self.compiled_step is not None and self.head_dim % 32 == 0 else None

    @staticmethod
    def _shapes(model: nn.Module) -> list[tuple[int, int]]:
        """(d_out, d_in) of the first layer's fused projections, then the head's."""
        layer = model.model.layers[0]
        shapes = []
        for parent, names in GROUPS.values():
            modules = [getattr(getattr(layer, parent), name) for name in names]
            shapes.append((sum(m.out_features for m in modules), modules[0].in_features))
        return shapes + [tuple(model.get_output_embeddings().weight.shape)]

    @torch.no_grad()
    def _lay_head(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output head in the runner's layout (the largest single product of a decoding step, vocab x d).

        Transposed or rows: the head (and a tied input embedding) keep a view of the runner's tensor, so no
        copy is added; packed: a copy beside the head's own weight; gemv and tiles: their copy and the head's own
        weight.
        """
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        held = hold(head.weight.detach(), self.weight_layout)
        if self.weight_layout == "transposed":
            tied = head.weight is embed.weight
            head.weight = nn.Parameter(held.T, requires_grad=False)
            if tied:
                embed.weight = head.weight
        return held, head.bias

    @torch.no_grad()
    def _fuse(self, layer: nn.Module) -> _Layer:
        weights, biases = {}, {}
        for group, (parent, names) in GROUPS.items():
            modules = [getattr(getattr(layer, parent), name) for name in names]
            fused = hold(torch.cat([m.weight for m in modules]), self.weight_layout)
            rows_held = rows_of(fused, self.weight_layout)
            if self.weight_layout != "packed":  # the modules keep (d_out, d_in) views of it: no copy kept
                start = 0
                for m in modules:
                    rows = m.weight.shape[0]
                    view = rows_held[start:start + rows] if rows_held is not None else fused[:, start:start + rows].T
                    m.weight = nn.Parameter(view, requires_grad=False)
                    start += rows
            weights[group] = fused
            has_bias = any(m.bias is not None for m in modules)
            biases[group] = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0])
                                       for m in modules]) if has_bias else None
        return _Layer(rms_norm(layer.input_layernorm), rms_norm(layer.post_attention_layernorm), layer.mlp.act_fn,
                      weights, biases)

    def _group_layout(self, index: int, layer: nn.Module, group: str) -> GroupLayout:
        parent, names = GROUPS[group]
        modules = [getattr(getattr(layer, parent), n) for n in names]
        return GroupLayout(group, tuple(f"model.layers.{index}.{parent}.{n}" for n in names),
                           tuple(m.out_features for m in modules), modules[0].in_features)

    def base_weight(self, module_name: str) -> torch.Tensor:
        """The base weight (d_out, d_in) of a projection, by its full module name."""
        return self.model.get_submodule(module_name).weight

    def _project(self, layer: _Layer, index: int, group: str, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        out = self._product(x, layer.weights[group])
        if lora is not None:
            lora.apply(index, group, x, out)
        bias = layer.biases[group]
        return out if bias is None else out.add_(bias)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        # x (N, heads, head_dim); cos/signed_sin (N, 1, head_dim): x cos + rotate_half(x) sin
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, dims=-1), signed_sin)

    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch,
                decode_mask: torch.Tensor | None) -> torch.Tensor:
        """Write k/v (N, kv_heads, head_dim) into the cache and return attention outputs (N, heads * head_dim)."""
        keys, values = self.cache.k[index], self.cache.v[index]  # (slots, kv_heads, max_seq_len, head_dim)
        n, group = batch.n_decode, self.n_heads // self.n_kv
        parts = []
        if n:
            pos = batch.positions[:n]
            rows = torch.arange(n, device=self.device)
            keys[rows, :, pos] = k[:n]
            values[rows, :, pos] = v[:n]
            length = decode_mask.shape[-1]
            # grouped-query heads: the group of query heads sharing a kv head acts as its query length
            out = F.scaled_dot_product_attention(
                q[:n].view(n, self.n_kv, group, self.head_dim), keys[:n, :, :length], values[:n, :, :length],
                attn_mask=decode_mask, scale=self.scaling)
            parts.append(out.reshape(n, -1))
        for slot, start, length in batch.prefills:
            span = slice(start, start + length)
            keys[slot, :, :length] = k[span].transpose(0, 1)
            values[slot, :, :length] = v[span].transpose(0, 1)
            if self._prefill_attention is not None:  # compiled, bf16: README, Serving
                parts.append(self._prefill_attention(q[span], keys[slot], values[slot], length, self.scaling))
                continue
            out = F.scaled_dot_product_attention(
                q[span].transpose(0, 1)[None], k[span].transpose(0, 1)[None], v[span].transpose(0, 1)[None],
                is_causal=True, scale=self.scaling, enable_gqa=True)
            parts.append(out[0].transpose(0, 1).reshape(length, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Run one step; returns the logits (len(logit_rows), vocab) in the model's dtype."""
        if self.compiled_step is not None and self.compiled_step.takes(batch):
            return self.compiled_step.run(batch)
        n_tok = batch.tokens.shape[0]
        h = self.embed(batch.tokens)  # (N, d)
        cos, sin = self.cos[batch.positions][:, None], self.signed_sin[batch.positions][:, None]  # (N, 1, head_dim)
        mask = None
        if batch.n_decode:
            pos = batch.positions[:batch.n_decode]
            length = int(pos.max()) + 1
            # (n, 1, 1, length), additive: row i sees positions 0..pos_i (a float mask, so that attention does
            # not convert a boolean one in every layer)
            hidden = torch.arange(length, device=self.device)[None] > pos[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
            mask = mask[:, None, None]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for index, layer in enumerate(self.layers):
            x = layer.input_norm(h)
            qkv = self._project(layer, index, "qkv", x, batch.lora)
            # q and k rotate together: (N, heads + kv_heads, head_dim)
            qk = self._rotate(qkv[:, :q_size + kv_size].view(n_tok, -1, self.head_dim), cos, sin)
            v = qkv[:, q_size + kv_size:].view(n_tok, self.n_kv, self.head_dim)
            attn = self._attend(index, qk[:, :self.n_heads], qk[:, self.n_heads:], v, batch, mask)
            h.add_(self._project(layer, index, "o", attn, batch.lora))
            x = layer.post_norm(h)
            gate, up = self._project(layer, index, "gate_up", x, batch.lora).chunk(2, dim=-1)
            h.add_(self._project(layer, index, "down", layer.act(gate).mul_(up), batch.lora))
        logits = self._product(self.norm(h[batch.logit_rows]), self.head_weight)
        return logits if self.head_bias is None else logits.add_(self.head_bias)
