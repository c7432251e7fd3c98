"""Prompts to token ids: text, ids and chat messages (the embedded tokenizer's ChatML template)."""
from __future__ import annotations

import pytest

from lorakit import LorakitError
from lorakit.serve.prompts import prompt_ids


def test_text_ids_and_chat_messages(smollm_tokenizer):
    tok = smollm_tokenizer
    assert prompt_ids(tok, "Hello there", len(tok)) == tok("Hello there")["input_ids"]
    assert prompt_ids(tok, [5, 6, 7], len(tok)) == [5, 6, 7]
    messages = [{"role": "user", "content": "Hi"}]
    ids = prompt_ids(tok, messages, len(tok))
    assert tok.decode(ids) == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face" \
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("prompt,message", [
    ("", "empty"), ([], "empty"), ([1, 10 ** 9], "must lie in"), ([{"role": "user"}], "'content'"),
    ([1.5], "must be text"), ([True], "must be text"),
])
def test_bad_prompts_are_refused(smollm_tokenizer, prompt, message):
    with pytest.raises(LorakitError, match=message):
        prompt_ids(smollm_tokenizer, prompt, len(smollm_tokenizer))
