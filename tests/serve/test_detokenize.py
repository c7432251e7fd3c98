"""Streaming text: token by token it adds up to the tokenizer's own decode; stop strings cut it anywhere."""
from __future__ import annotations

import pytest

from lorakit.serve.detokenize import IncrementalText

TEXT = "Grüße aus Köln — 東京 2024: naïve café, emoji 🎉 done.  Spaces   and\nnewlines."


def stream(tokenizer, ids, stop=()):
    text = IncrementalText(tokenizer, stop)
    pieces = [text.add(i) for i in ids]
    pieces.append(text.flush())
    return pieces, text


def test_deltas_add_up_to_the_decoded_text(smollm_tokenizer):
    ids = smollm_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, text = stream(smollm_tokenizer, ids)
    assert "".join(pieces) == smollm_tokenizer.decode(ids, skip_special_tokens=True) == text.final_text
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split


@pytest.mark.parametrize("stop", ["Köln", "café", "🎉", "\nnew", "s.", "ü"])
def test_stop_strings_cut_before_their_first_occurrence(smollm_tokenizer, stop):
    ids = smollm_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, text = stream(smollm_tokenizer, ids, stop=("never", stop))
    assert text.stopped
    assert "".join(pieces) == text.final_text == TEXT[:TEXT.index(stop)]


def test_text_that_may_become_a_stop_string_is_held_back(smollm_tokenizer):
    ids = smollm_tokenizer("abc abd", add_special_tokens=False)["input_ids"]
    text = IncrementalText(smollm_tokenizer, stop=("abx",))
    out = "".join(text.add(i) for i in ids)
    assert not out.endswith("ab")  # "ab" could still turn into "abx"
    assert out + text.flush() == "abc abd" and not text.stopped
