"""OpenAI messages with a system prompt and tool calls, ShareGPT conversations, through the chat template."""
import json

import pytest

from lorakit.core.errors import LorakitError
from lorakit.training.data.conversation import chat_record, sharegpt_record
from lorakit.training.data.records import load_records
from lorakit.training.data.tokenize import tokenize_records
from lorakit.training.loss import IGNORE_INDEX

# A tool-aware ChatML template (the shape of Qwen2.5's): tools in the system turn, calls as <tool_call> JSON.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
OPENAI = {
    "messages": [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
        {"role": "assistant", "content": "18 C and sunny."},
    ],
    "tools": [WEATHER],
}
SHAREGPT = {
    "system": "You answer briefly.",
    "tools": json.dumps([WEATHER]),
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": "18 C, sunny"},
        {"from": "gpt", "value": "18 C and sunny."},
    ],
}


@pytest.fixture
def tool_tokenizer(smollm_tokenizer):
    import copy

    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def test_openai_record_is_normalized():
    record = chat_record(OPENAI, "f:1")
    call = record["messages"][2]
    assert call == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}, "id": "call_1"}]}
    assert record["messages"][3] == {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"}
    assert record["tools"] == [WEATHER]


def test_sharegpt_reads_as_the_same_conversation():
    ours = sharegpt_record(SHAREGPT, "f:1")
    theirs = chat_record(OPENAI, "f:1")
    strip_ids = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in theirs["messages"]]
    for m in strip_ids:
        for c in m.get("tool_calls", []):
            c.pop("id")
    assert ours == {"messages": strip_ids, "tools": [WEATHER]}


@pytest.mark.parametrize("row, problem", [
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}, {"role": "assistant", "content": "y"}]},
     r"f:1: messages\[0\]: only assistant messages make tool calls"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "w", "arguments": "{city"}}]}]},
     r"messages\[0\]\.tool_calls\[0\]: function.arguments: invalid JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}]}, "no function name"),
    ({"messages": [{"role": "assistant", "content": ""}]}, "'content' is empty"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "unknown role 'developer'"),
])
def test_openai_errors(row, problem):
    with pytest.raises(LorakitError, match=problem):
        chat_record(row, "f:1")


def test_sharegpt_errors():
    with pytest.raises(LorakitError, match=r"f:1: conversations\[1\]: unknown speaker 'bot'"):
        sharegpt_record({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "f:1")
    with pytest.raises(LorakitError, match="no assistant message"):
        sharegpt_record({"conversations": [{"from": "human", "value": "a"}]}, "f:1")


def test_tool_calls_go_through_the_template(tool_tokenizer, tmp_path):
    (tmp_path / "sharegpt.jsonl").write_text(json.dumps(SHAREGPT) + "\n")
    (tmp_path / "openai.jsonl").write_text(json.dumps(OPENAI) + "\n")
    records, fmt = load_records(tmp_path / "sharegpt.jsonl")
    openai_records, openai_fmt = load_records(tmp_path / "openai.jsonl")
    assert fmt == openai_fmt == "chat"
    (sharegpt,) = tokenize_records(records, tool_tokenizer, fmt, max_seq_len=512)
    (openai,) = tokenize_records(openai_records, tool_tokenizer, fmt, max_seq_len=512)
    # the whole conversation is the template's own rendering (transformers' renderer is the reference)
    expected = tool_tokenizer.apply_chat_template(records[0]["messages"], tools=records[0]["tools"], tokenize=False)
    assert tool_tokenizer.decode(sharegpt["input_ids"]) == expected
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>' in expected
    assert '"description": "Weather in a city"' in expected
    trained = tool_tokenizer.decode([t for t, label in zip(sharegpt["input_ids"], sharegpt["labels"])
                                     if label != IGNORE_INDEX])
    # both assistant turns (the call and the answer) are trained; system, tools, user and tool result are not
    assert trained == ('<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>\n'
                       "18 C and sunny.<|im_end|>\n")
    assert openai["input_ids"] == sharegpt["input_ids"]  # the call id is not rendered by this template


def test_template_without_tool_support_is_refused(smollm_tokenizer, tmp_path):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(OPENAI) + "\n")
    records, fmt = load_records(path)
    with pytest.raises(LorakitError, match=r"tools.jsonl:1: the model's chat template does not render tool calls"):
        tokenize_records(records, smollm_tokenizer, fmt, max_seq_len=512, source=path)
