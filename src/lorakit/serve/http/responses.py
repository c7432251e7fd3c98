"""OpenAI's response and stream-chunk JSON for completions and chat completions."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

FINISH_REASONS = {"stop": "stop", "length": "length"}  # the engine's -> OpenAI's (abort/error never reach a choice)


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, index: int, text: str, finish: str | None, delta: bool, first: bool = False) -> dict[str, Any]:
    finish = FINISH_REASONS.get(finish, finish)
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if delta:
        content = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
        return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def full_response(kind: str, request_id: str, model: str, completions: list, created: int | None = None) -> dict:
    """The non-streamed body: one choice per completion (in index order) and the summed usage."""
    choices = [_choice(kind, i, c.text, c.finish_reason, delta=False) for i, c in enumerate(completions)]
    prompt = sum(c.prompt_tokens for c in _distinct_prompts(completions))
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt, sum(c.completion_tokens for c in completions))}


def _distinct_prompts(completions: list) -> list:
    # n choices of one prompt share its prompt tokens: count them once, as OpenAI does
    seen, out = set(), []
    for c in completions:
        key = getattr(c, "prompt_key", id(c))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


class ChunkWriter:
    """Server-sent events of one streamed request: `data: {json}\\n\\n` chunks, then `data: [DONE]`."""

    def __init__(self, kind: str, request_id: str, model: str, include_usage: bool) -> None:
        self.kind, self.id, self.model, self.include_usage = kind, request_id, model, include_usage
        self.created = int(time.time())
        self.started: set[int] = set()

    def _event(self, choices: list, usage_: dict | None = None, with_usage: bool | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if with_usage if with_usage is not None else self.include_usage:
            body["usage"] = usage_
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(self, index: int, text: str, finish: str | None) -> str:
        """A chunk for one choice's new text (the chat stream's first chunk names the assistant role)."""
        first = self.kind == "chat" and index not in self.started
        self.started.add(index)
        if first and finish is not None and text:  # a one-token answer: the role chunk, then the text
            return self.delta(index, "", None) + self.delta(index, text, finish)
        return self._event([_choice(self.kind, index, text, finish, delta=True, first=first)])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        """The last chunk of stream_options.include_usage: no choices, the request's usage."""
        return self._event([], usage(prompt_tokens, completion_tokens), with_usage=True)

    @staticmethod
    def error(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
