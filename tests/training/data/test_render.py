"""Tests for lorakit.training.data.render: records to (text, trained) pieces, prompts for exact match."""
from __future__ import annotations

import pytest
from conftest import CHAT_RECORD, INSTRUCTION_RECORD

from lorakit.core.errors import LorakitError
from lorakit.training.data.render import prompts_and_references, render_segments


def test_segments_rebuild_the_template_and_train_only_responses(smollm_tokenizer):
    segments = render_segments(CHAT_RECORD, "chat", smollm_tokenizer)
    full = smollm_tokenizer.apply_chat_template(CHAT_RECORD["messages"], tokenize=False)
    assert "".join(text for text, _ in segments) == full
    assert [text for text, trained in segments if trained] == ["Paris<|im_end|>\n", "Rome<|im_end|>\n"]


def test_prompts_and_references(smollm_tokenizer, smollm_tokenizer_without_template):
    tok, plain = smollm_tokenizer, smollm_tokenizer_without_template
    [(prompt, reference)] = prompts_and_references([INSTRUCTION_RECORD], tok, "instruction")
    assert reference == "5"
    assert prompt == tok.apply_chat_template(
        [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}], add_generation_prompt=True, tokenize=False
    )
    [(prompt, reference)] = prompts_and_references([CHAT_RECORD], tok, "chat")
    assert reference == "Rome"
    assert prompt == tok.apply_chat_template(CHAT_RECORD["messages"][:4], add_generation_prompt=True, tokenize=False)

    [(prompt, reference)] = prompts_and_references([INSTRUCTION_RECORD], plain, "instruction")
    assert prompt.endswith("### Response:\n") and reference == "5"
    with pytest.raises(LorakitError, match="instruction or chat"):
        prompts_and_references([{"text": "x"}], tok, "text")
