"""Prompt tuning (Lester et al. 2021): P learned input embeddings ahead of every sequence, in PEFT's format.

    decoder([prompt (P, d); embed(ids) (T, d)])  ->  hidden states of the T real tokens

A forward pre-hook on the decoder prepends the prompt when a sequence starts (no cache yet) and extends
the attention mask; a forward hook drops the P prompt positions from the output, so logits, labels and
losses keep the input's length (PEFT returns P extra logits; the other T agree with them). While
generating, later calls only shift masks and positions past the prompt, which stays in the cache. The
prompt is no weight and never merges. One prompt per model.

File: PEFT's `prompt_embeddings`, (P, hidden_size).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Collection

import torch
from torch import nn

from lorakit.core.config import config_from_dict
from lorakit.core.errors import LorakitError
from lorakit.methods.base import ModuleMethod
from lorakit.methods.prefix import (
    FILE_KEY,
    VirtualTokenConfig,
    VirtualTokenOptions,
    bind_call,
    cache_argument,
    decoder_of,
    free_decoder,
    virtual_token_functions,
    shift_for_virtual_tokens,
)

PEFT_TYPE = "PROMPT_TUNING"
_CONFIG_KEY = "lorakit_prompt_config"
# lorakit's init names and PEFT's (prompt_tuning_init).
INITS = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """A prompt's config (the fields are VirtualTokenConfig's).

    Args:
        init: "vocab": embeddings of P random vocabulary tokens (PEFT's SAMPLE_VOCAB); "random": N(0, 1).
        token_dim: the model's hidden size (set by `apply`, checked when loading).

    Raises:
        LorakitError: a non-positive length or an unknown init.
    """

    inits: ClassVar[Collection[str]] = INITS

    def to_dict(self) -> dict[str, Any]:
        """The config as a PEFT adapter_config.json dict."""
        return {**self.peft_fields(), "peft_type": PEFT_TYPE, "prompt_tuning_init": INITS[self.init],
                "prompt_tuning_init_text": None, "tokenizer_name_or_path": None, "tokenizer_kwargs": None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PromptTuningConfig":
        """Read a config written by lorakit or PEFT; raises LorakitError for unknown or unsupported fields."""
        ours = {peft: name for name, peft in INITS.items()}
        data = {**data, "init": ours.get(data.get("prompt_tuning_init"), "vocab")}  # PEFT's TEXT init: any will do
        return config_from_dict(cls, data, PEFT_TYPE, source,
                                unsupported={"num_transformer_submodules": 1, "modules_to_save": None},
                                ignored=frozenset({"prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                                                   "tokenizer_kwargs", "num_attention_heads", "num_layers"}))


class PromptEmbedding(nn.Module):
    """The learned prompt, `prompt_embeddings` (P, hidden_size), fp32."""

    def __init__(self, num_virtual_tokens: int, hidden_size: int, device: torch.device) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, hidden_size, device=device))
        self.prepended = False  # whether the running call got the prompt (and its output must lose it)
        self.handles: list = []


def _before(decoder: nn.Module, args: tuple, kwargs: dict):
    kwargs = bind_call(decoder, args, kwargs)
    prompt: PromptEmbedding = decoder.prompt_tuning
    cache = kwargs.get(cache_argument(decoder))
    prompt.prepended = cache is None or cache.get_seq_length() == 0
    if prompt.prepended:
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        embeds = embeds if embeds is not None else decoder.get_input_embeddings()(ids)  # (B, T, d)
        virtual = prompt.prompt_embeddings.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (B, P + T, d)
    shift_for_virtual_tokens(kwargs, prompt.num_virtual_tokens, in_input=prompt.prepended)
    return (), kwargs


def _after(decoder: nn.Module, args: tuple, output):
    prompt: PromptEmbedding = decoder.prompt_tuning
    if prompt.prepended:
        P = prompt.num_virtual_tokens
        output.last_hidden_state = output.last_hidden_state[:, P:]
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, P:] for h in output.hidden_states)
    return output


def prompt_embedding(model: nn.Module) -> PromptEmbedding | None:
    """The model's prompt, or None."""
    return next((m for m in model.modules() if isinstance(m, PromptEmbedding)), None)


def apply(model: nn.Module, config: PromptTuningConfig) -> nn.Module:
    """Give `model` a trainable prompt, in place; everything else is frozen.

    Returns:
        The same model.

    Raises:
        LorakitError: not a decoder-only transformers model, a prompt or prefix is already there, or the
            config's token_dim (read from a file) is not the model's hidden size.
    """
    decoder = free_decoder(model)
    embeddings = decoder.get_input_embeddings()
    hidden = embeddings.weight.shape[1]
    if config.token_dim not in (None, hidden):
        raise LorakitError(f"the prompt was made for token_dim={config.token_dim}, this model's hidden size is {hidden}; "
                           "use its base model.")
    model.requires_grad_(False)
    prompt = PromptEmbedding(config.num_virtual_tokens, hidden, embeddings.weight.device)
    if config.init == "vocab":
        with torch.no_grad():
            ids = torch.randint(0, embeddings.num_embeddings, (config.num_virtual_tokens,), device=embeddings.weight.device)
            prompt.prompt_embeddings.copy_(embeddings(ids).float())
    decoder.prompt_tuning = prompt
    prompt.handles = [decoder.register_forward_pre_hook(_before, with_kwargs=True), decoder.register_forward_hook(_after)]
    model.__dict__[_CONFIG_KEY] = dataclasses.replace(config, token_dim=hidden)
    return model


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {FILE_KEY: prompt_embedding(model).prompt_embeddings}


def _remove_parts(model: nn.Module) -> None:
    """Take the prompt and its hooks out of the model."""
    decoder = decoder_of(model)
    for handle in decoder.prompt_tuning.handles:
        handle.remove()
    del decoder.prompt_tuning


FUNCTIONS = virtual_token_functions(PromptTuningConfig.from_dict, apply, _tensors, _remove_parts, PromptEmbedding,
                                    _CONFIG_KEY, 'the model has no prompt to save; add one with lorakit.methods.prompt_tuning.apply(model, PromptTuningConfig()).')
save, load, remove = FUNCTIONS.save, FUNCTIONS.load, FUNCTIONS.remove


class PromptMethod(ModuleMethod):
    """`--method prompt`: learned input embeddings ahead of every sequence (never merged)."""

    name, options, peft_type, title = "prompt", VirtualTokenOptions, PEFT_TYPE, "a prompt (prompt tuning)"
    # A few input embeddings: larger steps still than a prefix's (1.2e-2 at the default --lr 2e-4).
    lr_ratio = 60.0
    functions = FUNCTIONS
    described = ("num_virtual_tokens", "token_dim")

    @staticmethod
    def configure(options: VirtualTokenOptions) -> PromptTuningConfig:
        return PromptTuningConfig(num_virtual_tokens=options.num_virtual_tokens)
