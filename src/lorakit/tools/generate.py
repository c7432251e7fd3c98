"""`lorakit generate` and `lorakit chat`: replies from a base model, or base + adapter."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

from lorakit.training.loading import load_with_adapter
from lorakit.training.models import LoadedModel


@dataclass
class GenerateConfig:
    prompt: str | None = None
    """The user message (rendered with the chat template); read from stdin when omitted."""
    model: str | None = None
    """Base model; omitted: the adapter's recorded base, else the embedded default."""
    adapter: str | None = None
    """Adapter directory to apply."""
    max_new_tokens: int = 128
    """Tokens to generate."""
    temperature: float = 0.0
    """0: greedy."""
    raw: bool = False
    """Use the prompt as is, without the chat template."""
    device: str | None = None
    """cpu, cuda ..."""
    quantize: Literal["none", "nf4", "int8"] = "none"
    """Hold the base's block linears in 4-bit NF4 or int8, as a QLoRA adapter was trained."""


def reply(loaded: LoadedModel, messages_or_text: str | list[dict], cfg: GenerateConfig) -> str:
    """The model's reply to a raw prompt (str) or to chat messages (rendered with the chat template).

    Args:
        loaded: the model and tokenizer.
        messages_or_text: the raw prompt text, or [{"role": ..., "content": ...}, ...].
        cfg: max_new_tokens and temperature (0: greedy).

    Returns:
        The generated text, special tokens removed.
    """
    import torch

    from lorakit.training.generation import stop_token_ids

    tok = loaded.tokenizer
    if isinstance(messages_or_text, str):
        text = messages_or_text
    else:
        text = tok.apply_chat_template(messages_or_text, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(loaded.model.device)
    sample = cfg.temperature > 0
    with torch.no_grad():
        out = loaded.model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=sample,
                                    temperature=cfg.temperature if sample else None, top_p=None, top_k=None,
                                    pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok))
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_generate(cfg: GenerateConfig) -> str:
    """Generate one reply from the base model or base + adapter, and print it.

    Raises:
        LorakitError: a model or adapter that cannot be loaded.
    """
    loaded = load_with_adapter(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    prompt = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    text = reply(loaded, prompt if cfg.raw else [{"role": "user", "content": prompt}], cfg)
    print(text)
    return text


def run_chat(cfg: GenerateConfig) -> None:
    """An interactive chat (empty line or Ctrl-D ends it).

    Raises:
        LorakitError: a model or adapter that cannot be loaded.
    """
    loaded = load_with_adapter(cfg.model, cfg.adapter, cfg.device, quantize=cfg.quantize)
    messages: list[dict] = []
    print("lorakit chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        answer = reply(loaded, messages, cfg)
        messages.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")
