"""Prompts to token ids: text as the tokenizer encodes it, token ids as given, chat messages through the
model's chat template with the assistant's turn opened."""
from __future__ import annotations

from typing import Any

from lorakit.core.errors import LorakitError


def prompt_ids(tokenizer: Any, prompt: str | list[int] | list[dict[str, str]], vocab_size: int) -> list[int]:
    """The token ids of a prompt.

    Args:
        tokenizer: a Hugging Face tokenizer (with a chat template for chat messages).
        prompt: text, token ids, or chat messages `[{"role": ..., "content": ...}]`.
        vocab_size: the model's vocabulary size, to check token ids against.

    Returns:
        The ids, at least one.

    Raises:
        LorakitError: an empty prompt, ids outside the vocabulary, malformed messages or no chat template.
    """
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):
            raise LorakitError("chat messages need a string 'role' and a string 'content' each.")
        if not getattr(tokenizer, "chat_template", None):
            raise LorakitError("this model's tokenizer has no chat template; send the prompt as text.")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        if any(not 0 <= i < vocab_size for i in prompt):
            raise LorakitError(f"prompt token ids must lie in [0, {vocab_size}).")
        ids = list(prompt)
    else:
        raise LorakitError("prompt must be text, a list of token ids, or a list of chat messages.")
    if not ids:
        raise LorakitError("the prompt is empty; give at least one token.")
    return ids
