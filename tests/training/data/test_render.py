"""Tests for lorakit.training.data.render: records to (text, trained) pieces, prompts for exact match."""
from __future__ import annotations

import pytest

from lorakit.core.errors import LorakitError
from lorakit.training.data.render import prompts_and_references, render_segments

INSTRUCTION = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome"},
    ]
}


@pytest.fixture
def tokenizer(smollm_tokenizer):
    """The embedded SmolLM2 tokenizer, with its ChatML template."""
    return smollm_tokenizer


@pytest.fixture
def plain_tokenizer(smollm_tokenizer_without_template):
    """The same tokenizer without a chat template, to exercise the Alpaca-style fallback."""
    return smollm_tokenizer_without_template


def test_segments_rebuild_the_template_and_train_only_responses(tokenizer):
    segments = render_segments(CHAT, "chat", tokenizer)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert [text for text, trained in segments if trained] == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]


def test_prompts_and_references(tokenizer, plain_tokenizer):
    [(prompt, reference)] = prompts_and_references([INSTRUCTION], tokenizer, "instruction")
    assert reference == "5"
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], add_generation_prompt=True, tokenize=False
    )
    [(prompt, reference)] = prompts_and_references([CHAT], tokenizer, "chat")
    assert reference == "Rome"
    assert prompt == tokenizer.apply_chat_template(CHAT["messages"][:4], add_generation_prompt=True, tokenize=False)

    [(prompt, reference)] = prompts_and_references([INSTRUCTION], plain_tokenizer, "instruction")
    assert prompt.endswith("### Response:\n") and reference == "5"
    with pytest.raises(LorakitError, match="instruction or chat"):
        prompts_and_references([{"text": "x"}], tokenizer, "text")

