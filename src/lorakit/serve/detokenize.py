"""Token ids to streamed text, one token at a time, with stop strings.

Decoding each new token alone breaks multi-byte characters and words that a tokenizer spells with
leading-space markers, and decoding everything again each step costs O(n) per token. As in Hugging Face
TGI and vLLM, a short window is decoded twice (before and with the new token) and the difference is the
new text; a window ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token.

Text that could still be the start of a stop string is held back until it cannot.
"""
from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalText:
    """The text of a growing list of generated tokens, and whether a stop string has ended it.

    Args:
        tokenizer: a Hugging Face tokenizer (its `decode`).
        stop: stop strings; the text ends before the first one found.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # all the decoded text so far (before any stop string cut)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False
        self._prefix_offset = 0  # the window decoded for context starts here
        self._read_offset = 0  # tokens before this are already in self.text

    def add(self, token_id: int) -> str:
        """Take one more token; return the text that is now safe to hand out (possibly "")."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        after = decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith(_INCOMPLETE):
            self.text += after[len(before):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """The text still held back, at the end of the generation."""
        if self.stopped:
            return ""
        rest = self.tokenizer.decode(self.ids[self._prefix_offset:], skip_special_tokens=True)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        self.text += rest[len(prefix):]
        out = self._release(final=True)
        self._read_offset = len(self.ids)
        return out

    @property
    def final_text(self) -> str:
        return self.text[:self.emitted]

    def _release(self, final: bool = False) -> str:
        # Search only where a stop string could newly end: from just before what was already emitted.
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - _held_back(self.text, self.stop)
        out = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
