"""Prefix tuning (Li & Liang 2021) for decoder-only transformers (the Llama and GPT-2 families), through
the attention cache, in PEFT's file format.

Every layer's attention sees P learned key/value vectors ahead of the real tokens:

    attention(q, [K_prefix; K], [V_prefix; V])          K_prefix, V_prefix: (batch, kv_heads, P, head_dim)

A forward pre-hook on the decoder (LlamaModel, GPT2Model, ...) hands it a key/value cache that already
holds the prefix; the attention mask gets P leading ones and the real tokens sit at positions P..P+T-1,
as in PEFT's PeftModelForCausalLM, so PEFT's files load and give the same logits. Generation works
unchanged: the first call fills the generation cache with the prefix, later calls only shift masks and
positions. The prefix is no weight and never merges. One prefix per model.

File: PEFT's `prompt_embeddings`, (P, num_layers * 2 * kv_heads * head_dim), laid out per virtual
token as [layer][key, value][head][head_dim].
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Collection

import torch
from torch import nn

from lorakit.core.config import config_from_dict
from lorakit.core.errors import LorakitError
from lorakit.methods.base import ModuleFunctions, ModuleMethod

PEFT_TYPE = "PREFIX_TUNING"
INITS = ("vocab", "random")
FILE_KEY = "prompt_embeddings"
_CONFIG_KEY = "lorakit_prefix_config"


@dataclass
class VirtualTokenConfig:
    """What prefix and prompt tuning configs share (PEFT's PromptLearningConfig fields): how many virtual
    tokens and how they start.

    Args:
        num_virtual_tokens: P, the number of virtual tokens.
        init: one of the subclass's `inits`: "vocab" starts from P random vocabulary tokens, "random" from N(0, 1).
        token_dim: the width of one virtual token (set by `apply`, checked when loading).
        base_model_name_or_path: the base model (recorded).
        task_type: PEFT's task type; PEFT needs "CAUSAL_LM" to apply a prefix or prompt.

    Raises:
        LorakitError: a non-positive length or an unknown init.
    """

    inits: ClassVar[Collection[str]] = INITS
    num_virtual_tokens: int = 20
    init: str = "vocab"
    token_dim: int | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        check_virtual_token_fields(self.num_virtual_tokens, self.init, self.inits)

    def peft_fields(self) -> dict[str, Any]:
        """The adapter_config.json fields both methods write: every field but `init` (lorakit's, not
        PEFT's), and PEFT's fixed ones."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "init"}
        return {**out, "num_transformer_submodules": 1, "modules_to_save": None, "inference_mode": True}


@dataclass
class PrefixConfig(VirtualTokenConfig):
    """A prefix's config; the geometry fields are filled from the model.

    Args (beyond VirtualTokenConfig's):
        init: "vocab": the keys/values the model itself computes for P random vocabulary tokens (Li &
            Liang's initialization from real activations); "random": N(0, 1), as PEFT.
        num_layers, num_attention_heads: the model's layers and key/value heads; token_dim is
            kv_heads * head_dim (PEFT's fields; set by `apply`, checked when loading).

    Raises:
        LorakitError: a non-positive length or an unknown init.
    """

    num_layers: int | None = None
    num_attention_heads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as a PEFT adapter_config.json dict (how the prefix started is not PEFT's to know)."""
        return {**self.peft_fields(), "peft_type": PEFT_TYPE, "prefix_projection": False,
                "encoder_hidden_size": self.token_dim, "init_weights": None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PrefixConfig":
        """Read a config written by lorakit or PEFT; raises LorakitError for unknown or unsupported fields."""
        return config_from_dict(cls, data, PEFT_TYPE, source,
                                unsupported={"prefix_projection": False, "num_transformer_submodules": 1,
                                             "modules_to_save": None},
                                ignored=frozenset({"encoder_hidden_size", "init_weights"}))


def check_virtual_token_fields(n: Any, init: str, inits) -> None:
    """The fields prefix and prompt tuning share. Raises LorakitError unless n is a positive integer (a
    number of virtual tokens) and init one of `inits`."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise LorakitError(f"num_virtual_tokens={n!r} is invalid: use a positive integer, e.g. 20.")
    if init not in inits:
        raise LorakitError(f"init={init!r} is invalid: use one of {', '.join(inits)}.")


# ---- what prefix and prompt tuning share: a decoder call with virtual tokens ahead of the real ones ----
def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack that takes the cache (LlamaModel inside LlamaForCausalLM, GPT2Model, ...).

    Raises:
        LorakitError: not a decoder-only transformers model.
    """
    config = getattr(model, "config", None)
    decoder = getattr(model, "base_model", model)
    if config is None or config.is_encoder_decoder or cache_argument(decoder) is None:
        raise LorakitError(f"{type(model).__name__} is not a decoder-only transformers model with a key/value cache; "
                           "prefix and prompt tuning support causal LMs such as the Llama and GPT-2 families.")
    return decoder


def cache_argument(decoder: nn.Module) -> str | None:
    """The name under which the decoder takes its cache: `cache` (transformers 5) or `past_key_values`."""
    params = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def bind_call(decoder: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A decoder call's arguments, all by name (the hooks rewrite them by name)."""
    if not args:
        return dict(kwargs)
    return dict(inspect.signature(decoder.forward).bind_partial(*args, **kwargs).arguments)


def shift_for_virtual_tokens(kwargs: dict, n: int, in_input: bool) -> None:
    """Adjust a decoder call for n virtual tokens ahead of the real ones, in place.

    The 2-D attention mask (batch, seq) gets n leading ones; position ids (and cache positions, on
    older transformers) move up by n. When `in_input`, the n tokens are part of this call's input, and
    positions 0..n-1 are prepended for them.

    Raises:
        LorakitError: a 4-D attention mask, which lorakit cannot extend.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise LorakitError("prefix/prompt tuning needs a 2-D attention mask (batch, seq); pass that instead of a 4-D mask.")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    for key in ("position_ids", "cache_position"):
        positions = kwargs.get(key)
        if positions is not None:
            shifted = positions + n
            if in_input:
                lead = torch.arange(n, device=positions.device, dtype=positions.dtype)
                shifted = torch.cat([lead.expand(*positions.shape[:-1], n), shifted], dim=-1)
            kwargs[key] = shifted


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) of a transformers decoder."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def batch_size(kwargs: dict) -> int:
    """The batch size of a decoder call (from input_ids, else inputs_embeds)."""
    ids = kwargs.get("input_ids")
    return (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]


# ---- the layer -------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """The learned prefix, `prompt_embeddings` (P, layers * 2 * kv_heads * head_dim), fp32."""

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                 device: torch.device) -> None:
        super().__init__()
        self.num_virtual_tokens, self.shape = num_virtual_tokens, (num_layers, 2, kv_heads, head_dim)
        self.prompt_embeddings = nn.Parameter(
            torch.randn(num_virtual_tokens, 2 * num_layers * kv_heads * head_dim, device=device))
        self.handle = None

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (key, value), each (batch, kv_heads, P, head_dim)."""
        P = self.num_virtual_tokens
        # (P, L*2*H*D) -> (P, L, 2, H, D) -> (L, 2, H, P, D)
        per_layer = self.prompt_embeddings.to(dtype).view(P, *self.shape).permute(1, 2, 3, 0, 4)
        return [(kv[0].expand(batch, -1, -1, -1), kv[1].expand(batch, -1, -1, -1)) for kv in per_layer]

    @torch.no_grad()
    def init_from_activations(self, decoder: nn.Module) -> None:
        """Start from the keys/values the decoder computes for P random vocabulary tokens."""
        vocab = decoder.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, self.num_virtual_tokens), device=self.prompt_embeddings.device)
        out = decoder(input_ids=ids, use_cache=True)
        cache = out.get(cache_argument(decoder))
        # per layer (1, H, P, D) -> (L, 2, H, P, D) -> (P, L, 2, H, D)
        stacked = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        self.prompt_embeddings.copy_(stacked.permute(3, 0, 1, 2, 4).reshape(self.prompt_embeddings.shape))


def _hook(decoder: nn.Module, args: tuple, kwargs: dict):
    from transformers import DynamicCache

    kwargs = bind_call(decoder, args, kwargs)
    prefix: PrefixEncoder = decoder.prefix_tuning
    name = cache_argument(decoder)
    cache = kwargs.get(name)
    if cache is None or cache.get_seq_length() == 0:  # a new sequence: its cache starts with the prefix
        if decoder.training and getattr(decoder, "gradient_checkpointing", False):
            raise LorakitError("prefix tuning does not work with gradient checkpointing (the recomputed layers "
                               "would not see the prefix); turn gradient checkpointing off.")
        cache = cache if cache is not None else DynamicCache(config=decoder.config)
        dtype = decoder.get_input_embeddings().weight.dtype
        for layer, (key, value) in enumerate(prefix.key_values(batch_size(kwargs), dtype)):
            cache.update(key, value, layer)
        kwargs[name] = cache
    shift_for_virtual_tokens(kwargs, prefix.num_virtual_tokens, in_input=False)
    return (), kwargs


# ---- injection and files ------------------------------------------------------------------------
def prefix_encoder(model: nn.Module) -> PrefixEncoder | None:
    """The model's prefix, or None."""
    return next((m for m in model.modules() if isinstance(m, PrefixEncoder)), None)


def virtual_token_functions(read_config, apply, tensors, remove_parts, part_type, config_key: str,
                            missing: str) -> ModuleFunctions:
    """The ModuleFunctions of a virtual-token method (prefix, prompt): a loaded file's tensors replace the init."""
    return ModuleFunctions(read_config, apply, tensors, remove_parts, part_type, config_key, missing,
                           loaded_overrides={"init": "random"})


def free_decoder(model: nn.Module) -> nn.Module:
    """The decoder of `model`, checked to hold neither a prefix nor a prompt yet (both claim the first positions).

    Raises:
        LorakitError: not a decoder-only transformers model, or a prefix or prompt is already there.
    """
    decoder = decoder_of(model)
    if prefix_encoder(model) is not None or hasattr(decoder, "prompt_tuning"):
        raise LorakitError("the model already has a prefix or a prompt: lorakit holds one of them per model "
                           "(both claim the first positions).")
    return decoder


def apply(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Give `model` a trainable prefix, in place; everything else is frozen.

    Returns:
        The same model.

    Raises:
        LorakitError: not a decoder-only transformers model, a prefix or prompt is already there, or the
            config's geometry (read from a file) does not fit the model.
    """
    decoder = free_decoder(model)
    layers, kv_heads, head_dim = geometry(model)
    wanted = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    wrong = {k: v for k, v in wanted.items() if getattr(config, k) not in (None, v)}
    if wrong:
        raise LorakitError(f"the prefix was made for {', '.join(f'{k}={getattr(config, k)}' for k in wrong)}, "
                           f"this model has {', '.join(f'{k}={v}' for k, v in wrong.items())}; use its base model.")
    model.requires_grad_(False)
    device = decoder.get_input_embeddings().weight.device
    encoder = PrefixEncoder(config.num_virtual_tokens, layers, kv_heads, head_dim, device)
    if config.init == "vocab":
        encoder.init_from_activations(decoder)
    decoder.prefix_tuning = encoder
    encoder.handle = decoder.register_forward_pre_hook(_hook, with_kwargs=True)
    model.__dict__[_CONFIG_KEY] = dataclasses.replace(config, **wanted)
    return model


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {FILE_KEY: prefix_encoder(model).prompt_embeddings}


def _remove_parts(model: nn.Module) -> None:
    """Take the prefix and its hook out of the model."""
    decoder = decoder_of(model)
    decoder.prefix_tuning.handle.remove()
    del decoder.prefix_tuning


FUNCTIONS = virtual_token_functions(PrefixConfig.from_dict, apply, _tensors, _remove_parts, PrefixEncoder,
                                    _CONFIG_KEY, 'the model has no prefix to save; add one with lorakit.methods.prefix.apply(model, PrefixConfig()).')
save, load, remove = FUNCTIONS.save, FUNCTIONS.load, FUNCTIONS.remove


@dataclass
class VirtualTokenOptions:
    """The options of prefix and prompt tuning (`--method prefix`, `--method prompt`)."""

    num_virtual_tokens: int = 20
    """Prefix and prompt tuning: virtual tokens."""


class PrefixMethod(ModuleMethod):
    """`--method prefix`: a learned prefix in every layer's attention cache (never merged)."""

    name, options, peft_type, title = "prefix", VirtualTokenOptions, PEFT_TYPE, "a prefix (prefix tuning)"
    # A few key/value vectors: larger steps than LoRA's factors (4e-3 at the default --lr 2e-4).
    lr_ratio = 20.0
    functions = FUNCTIONS
    described = ("num_virtual_tokens", "num_layers", "token_dim")

    @staticmethod
    def configure(options: VirtualTokenOptions) -> PrefixConfig:
        return PrefixConfig(num_virtual_tokens=options.num_virtual_tokens)
