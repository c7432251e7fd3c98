"""Rendering records to text: the tokenizer's chat template when it has one, else an Alpaca-style fallback.

A rendered record is a list of ``(text, trained)`` pieces; the trained pieces are the responses.
All rendered text is meant to be tokenized with ``add_special_tokens=False``: the template (or the
fallback) already wrote any BOS/EOS.
"""
from __future__ import annotations

from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.training.data.conversation import check_tools_rendered, render
from lorakit.training.data.records import record_location


def conversation(record: dict, format: str) -> list[dict]:
    """The conversation of an instruction or chat record, ending at its last assistant turn.

    Turns after the last assistant message carry no trained tokens, so they are dropped.

    Args:
        record: an instruction or chat record.
        format: ``"instruction"`` or ``"chat"``.

    Returns:
        ``{"role", "content"}`` messages (with their tool calls), the last one the assistant's.
    """
    if format == "instruction":
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    messages = [dict(m) for m in record["messages"]]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[: last + 1]


def bos_text(tokenizer: Any) -> str:
    """The BOS token as text when the tokenizer adds one by default (Llama-style), else ``""``.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The text to start a rendering with.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if bos is not None and ids and ids[0] == bos else ""


def render_segments(record: dict, format: str, tokenizer: Any) -> list[tuple[str, bool]]:
    """Split a rendered instruction/chat record into ``(text, trained)`` pieces.

    With a chat template, the response of assistant turn i is
    ``full[len(prompt):]`` where prompt renders ``messages[:i]`` with the generation prompt
    and full renders ``messages[:i+1]``; it includes the template's end-of-turn marker so
    the model learns to stop. Without one, an Alpaca-style template is used.

    Args:
        record: an instruction or chat record.
        format: ``"instruction"`` or ``"chat"``.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The pieces in order, empty ones left out.

    Raises:
        LorakitError: the chat template rejects the conversation, renders earlier turns
            differently once later turns follow, so response tokens cannot be located, or leaves the
            record's tool calls or tools out of its text.
    """
    from jinja2 import (
        TemplateError,  # chat templates are Jinja; transformers depends on it
    )

    messages, tools = conversation(record, format), record.get("tools")
    if not getattr(tokenizer, "chat_template", None):
        return _fallback_segments(record, format, messages, tokenizer)
    if tools or any(m.get("tool_calls") for m in messages):
        check_tools_rendered(tokenizer, messages, tools)
    segments: list[tuple[str, bool]] = []
    done = ""  # text rendered so far; every later rendering must extend it
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            full = render(tokenizer, messages[: i + 1], tools)
        except TemplateError as e:
            raise LorakitError(
                f"the model's chat template rejects this conversation ({e}); "
                "reorder its messages as the template expects (often: optional system, then "
                "alternating user/assistant starting with user)."
            ) from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise LorakitError(
                f"the model's chat template renders turn {i} differently once later turns follow, "
                "so the response tokens cannot be located; split the conversation into one record "
                "per assistant turn."
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]


def _fallback_segments(
    record: dict, format: str, messages: list[dict], tokenizer: Any
) -> list[tuple[str, bool]]:
    """Alpaca-style rendering for tokenizers without a chat template.

    ``### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n`` then the response
    and EOS. Chat system turns become a leading paragraph, user turns become instructions.
    """
    if record.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise LorakitError("tool calls and tool results need the model's chat template, and this tokenizer has "
                           "none; use a model with a chat template that supports tools.")
    eos = tokenizer.eos_token or ""
    if format == "instruction":
        prompt = f"### Instruction:\n{record['instruction']}\n\n"
        if record.get("input"):
            prompt += f"### Input:\n{record['input']}\n\n"
        return [(bos_text(tokenizer) + prompt + "### Response:\n", False), (record["output"] + eos, True)]
    segments: list[tuple[str, bool]] = []
    pending = bos_text(tokenizer)  # untrained text waiting for the next assistant turn
    for message in messages:
        if message["role"] == "system":
            pending += f"{message['content']}\n\n"
        elif message["role"] == "user":
            pending += f"### Instruction:\n{message['content']}\n\n"
        else:
            segments += [(pending + "### Response:\n", False), (message["content"] + eos, True)]
            pending = "\n\n"
    return segments


def prompts_and_references(records: list[dict], tokenizer: Any, format: str) -> list[tuple[str, str]]:
    """Generation prompts and reference responses for exact-match evaluation.

    Args:
        records: instruction or chat records.
        tokenizer: the tokenizer whose chat template (or the fallback) renders prompts.
        format: ``"instruction"`` or ``"chat"``.

    Returns:
        ``(prompt, reference)`` pairs: the rendered text up to and including the generation
        prompt of the last assistant turn (tokenize it with ``add_special_tokens=False``),
        and that turn's content (the ``output`` for instruction records).

    Raises:
        LorakitError: ``format`` is not instruction or chat.
    """
    if format not in ("instruction", "chat"):
        raise LorakitError(
            f"Exact-match evaluation needs instruction or chat data, not {format!r}; "
            "text data has no reference responses."
        )
    pairs = []
    for index, record in enumerate(records):
        try:
            segments = render_segments(record, format, tokenizer)
        except LorakitError as e:
            raise LorakitError(f"{record_location(record, index, None)}: {e}") from None
        # The last segment is the final response; everything before it is its prompt.
        prompt = "".join(text for text, _ in segments[:-1])
        pairs.append((prompt, conversation(record, format)[-1]["content"]))
    return pairs
