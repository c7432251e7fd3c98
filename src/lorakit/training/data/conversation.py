"""Conversations: OpenAI `messages` (system prompt, tool calls, tool results, a `tools` list) and ShareGPT
`conversations` (`from`/`value`), checked and brought to one form that chat templates take.

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str,
                   "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}],  # assistant
                   "tool_call_id": str, "name": str}],                                                # tool
     "tools": [{"type": "function", "function": {"name", "description", "parameters"}}]}              # optional

Tool-call arguments are parsed into dicts (OpenAI writes them as JSON strings; Hugging Face chat templates
expect dicts). ShareGPT's roles: human/user, gpt/assistant/model, system, observation/tool (a tool result),
function_call (an assistant tool call whose value is the call as JSON); a top-level `system` and `tools` are
taken too, as LLaMA-Factory writes them.
"""
from __future__ import annotations

from typing import Any

from lorakit.core.errors import LorakitError
from lorakit.training.data.json_values import json_value

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant",
}


def parse_json_field(value: Any, where: str, kind: type) -> Any:
    """`value` itself when it is already a `kind`, else `value` parsed from a JSON string (CSV cells, OpenAI
    tool-call arguments) and checked to be a `kind`."""
    return json_value(value, where, kind, "write a JSON list." if kind is list else "write a JSON object.")


def text_field(message: dict, key: str, where: str, nonempty: bool = False) -> str:
    """`message[key]` as a string; missing or null is "" unless `nonempty`."""
    value = message.get(key)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise LorakitError(f"{where}: field {key!r} must be a string, got {type(value).__name__}.")
    if nonempty and not value.strip():
        raise LorakitError(f"{where}: field {key!r} is empty; give it some text or remove the message.")
    return value


def tool_call(call: Any, where: str) -> dict:
    """One OpenAI tool call ({"type": "function", "function": {"name", "arguments"}}) with dict arguments."""
    if not isinstance(call, dict) or not isinstance(call.get("function", call), dict):
        raise LorakitError(f"{where} must be an object like "
                           '{"type": "function", "function": {"name": "...", "arguments": {...}}}.')
    function = call.get("function", call)  # ShareGPT's function_call value is the function itself
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise LorakitError(f"{where}: the call has no function name; give function.name.")
    arguments = parse_json_field(function.get("arguments", {}), f"{where}: function.arguments", dict)
    clean = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        clean["id"] = call["id"]
    return clean


def chat_message(message: Any, where: str) -> dict:
    """One checked OpenAI message: role, content, and tool_calls / tool_call_id / name where they apply."""
    if not isinstance(message, dict):
        raise LorakitError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}.")
    role = message.get("role")
    if role not in ROLES:
        raise LorakitError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}.")
    calls = message.get("tool_calls") or []
    if calls and role != "assistant":
        raise LorakitError(f"{where}: only assistant messages make tool calls, this one is {role!r}.")
    if not isinstance(calls, list):
        raise LorakitError(f"{where}: 'tool_calls' must be a list of calls.")
    clean = {"role": role, "content": text_field(message, "content", where, nonempty=role == "assistant" and not calls)}
    if calls:
        clean["tool_calls"] = [tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    for key in ("tool_call_id", "name") if role == "tool" else ():
        if message.get(key) is not None:
            clean[key] = text_field(message, key, where)
    return clean


def chat_record(row: dict, where: str) -> dict:
    """A checked OpenAI-format record: {"messages": [...]} plus {"tools": [...]} when the row has tools.

    Raises:
        LorakitError: `messages` is missing, empty or malformed, or no assistant message carries anything to
            train on; the message names `where` and the offending message.
    """
    if row.get("messages") is None:
        raise LorakitError(f"{where}: missing field 'messages'; chat records need a list of {{role, content}}.")
    messages = row["messages"]
    if isinstance(messages, str) and messages.lstrip().startswith("["):  # a CSV cell holding the JSON list
        messages = parse_json_field(messages, f"{where}: 'messages'", list)
    if not isinstance(messages, list) or not messages:
        raise LorakitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects.")
    clean = [chat_message(m, f"{where}: messages[{i}]") for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in clean):
        raise LorakitError(f"{where}: the conversation has no assistant message, so there is nothing to train on; "
                           "add one.")
    record: dict[str, Any] = {"messages": clean}
    if row.get("tools"):
        record["tools"] = parse_json_field(row["tools"], f"{where}: 'tools'", list)
    return record


def sharegpt_record(row: dict, where: str) -> dict:
    """A ShareGPT record ({"conversations": [{"from", "value"}], "system"?, "tools"?}) as a checked chat record.

    Raises:
        LorakitError: `conversations` is missing or malformed, a turn has an unknown `from`, or a function_call
            turn does not hold a JSON call; the message names `where` and the turn.
    """
    turns = row.get("conversations")
    if turns is None:
        raise LorakitError(f"{where}: missing field 'conversations'; ShareGPT records need a list of {{from, value}}.")
    turns = parse_json_field(turns, f"{where}: 'conversations'", list)
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for i, turn in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise LorakitError(f"{at}: unknown speaker {got!r}; 'from' must be one of {', '.join(SHAREGPT_ROLES)}.")
        value = text_field(turn, "value", at)
        if turn["from"] == "function_call":
            call = parse_json_field(value, f"{at}: value", dict)
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": value})
    return chat_record({"messages": messages, "tools": row.get("tools")}, where)


def render(tokenizer: Any, messages: list[dict], tools: list | None, **options) -> str:
    """The chat template's text for `messages` (with the `tools` list where given)."""
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **options)


def check_tools_rendered(tokenizer: Any, messages: list[dict], tools: list | None) -> None:
    """Refuse a conversation whose tool calls or tools list the model's chat template leaves out of its text:
    training on it would teach the turn without the call.

    Raises:
        LorakitError: a 'tools' field that is not a list of JSON objects, or a template that renders the
            same text with and without them.
    """
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise LorakitError(f"a record's 'tools' must be a list of JSON objects (function schemas, as in OpenAI's "
                           f"API), got {str(tools)[:80]}; fix the record or drop its 'tools' field.")
    calls = [i for i, m in enumerate(messages) if m.get("tool_calls")]
    bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    if calls and render(tokenizer, messages, tools) == render(tokenizer, bare, tools):
        raise LorakitError("the model's chat template does not render tool calls (it leaves them out of the text); "
                           "use a model whose template supports tools, or write the call into the message content.")
    if tools and render(tokenizer, messages, tools) == render(tokenizer, messages, None):
        raise LorakitError("the model's chat template does not render the 'tools' list; use a model whose "
                           "template supports tools, or describe the tools in a system message.")
