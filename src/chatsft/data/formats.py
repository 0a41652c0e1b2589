"""Detect a row's format and normalise it to one of Text, Conversation or PromptCompletion.

Validation happens here, once, so every later stage can trust its input. Errors name the row and field.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ChatSFTError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("text", "messages", "sharegpt", "prompt_completion", "query_response", "tokenized")
# ShareGPT speaker names → chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


# Levels of lists and objects allowed inside one row value (`[[1]]` is 2). Chat rows need 3 or 4,
# tool calls and JSON schemas rarely 15; pyarrow refuses more than 62 (datasets' reader fails with
# "Recursion level in ArrowSchema struct exceeded"), and JSON nested 1,000 deep overflows Python's
# stack (RecursionError) in json, datasets and Jinja's tojson alike. Deeper values are corrupt or
# hostile data, refused with the row and field instead.
MAX_DEPTH = 32


def too_deep(row: int | None, field: str | None, source: str | None) -> ChatSFTError:
    return ChatSFTError(
        f"nested more than {MAX_DEPTH} levels deep",
        source=source,
        row=row,
        field=field,
        hint="rows hold messages, text or token ids; a value this deep is corrupt data",
    )


_CONTAINERS = (list, tuple, dict)


def check_depth(value: Any, row: int, field: str, source: str | None) -> None:
    """Refuse a value nested more than MAX_DEPTH levels. Level by level, not recursive (a deep value
    cannot overflow the stack here), visiting containers only: strings and numbers are leaves."""
    level = [value]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise too_deep(row, field, source)
        deeper = []
        for v in level:
            for child in v.values() if isinstance(v, dict) else v:
                if isinstance(child, _CONTAINERS):
                    deeper.append(child)
        level = deeper


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    # Extra template variables of this row (TRL's `chat_template_kwargs` column), e.g.
    # {"enable_thinking": False}.
    template_kwargs: dict[str, Any] | None = None


@dataclass(frozen=True)
class Tokenized:
    """Pre-tokenized rows: ids as given; labels as given, or the ids where a mask says trained and
    -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class PromptCompletion:
    """`prompt`/`completion` are both strings, or both lists of messages."""

    prompt: str | list[dict[str, Any]]
    completion: str | list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None  # conversational rows only, as for Conversation
    template_kwargs: dict[str, Any] | None = None


Example = Text | Conversation | PromptCompletion | Tokenized


def detect_format(
    columns: Sequence[str], dataset_text_field: str = "text", override: str | None = None
) -> str:
    """Pick the row format from the column names (or check the user's override)."""
    if override is not None:
        if override not in FORMATS:
            raise ChatSFTError(
                f"unknown dataset_format {override!r}", hint=f"use one of {', '.join(FORMATS)}"
            )
        return override
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"query", "response"} <= cols:
        return "query_response"
    if "input_ids" in cols:
        return "tokenized"
    if dataset_text_field in cols:
        return "text"
    raise ChatSFTError(
        f"cannot tell the data format from the columns {sorted(cols)}",
        hint=(
            f"expected a '{dataset_text_field}' column (text; see dataset_text_field), 'messages' "
            "(chat), 'conversations' (ShareGPT), 'prompt' + 'completion', 'query' + 'response' "
            "(rename yours with column_map), or 'input_ids'; or pass formatting_func"
        ),
    )


def check_messages(messages: Any, row: int, field: str, source: str | None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatSFTError(
            "expected a non-empty list of {role, content} messages",
            source=source,
            row=row,
            field=field,
        )
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise ChatSFTError(
                f"expected a {{role, content}} object, got {type(m).__name__}",
                source=source,
                row=row,
                field=where,
            )
        role = m.get("role")
        if role not in ROLES:
            raise ChatSFTError(
                f"unknown role {role!r}",
                source=source,
                row=row,
                field=f"{where}.role",
                hint=f"roles are {', '.join(ROLES)}",
            )
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None and not (
            isinstance(calls, list) and all(isinstance(c, Mapping) for c in calls)
        ):
            # A template iterates the calls: a string would render one "call" per character.
            raise ChatSFTError(
                "tool_calls must be a list of {type, function} objects, got " + _type_names(calls),
                source=source,
                row=row,
                field=f"{where}.tool_calls",
            )
        has_calls = bool(calls)
        if content is None and not has_calls:
            raise ChatSFTError(
                "content is missing or null", source=source, row=row, field=f"{where}.content"
            )
        if content is not None and not isinstance(content, str):
            raise ChatSFTError(
                f"content must be a string, got {type(content).__name__}",
                source=source,
                row=row,
                field=f"{where}.content",
            )
        # An empty system prompt is common in ShareGPT/OpenHermes dumps and renders as the
        # template renders it; other empty turns (an empty trained reply) are data errors.
        if content is not None and not content.strip() and not has_calls and role != "system":
            raise ChatSFTError("content is empty", source=source, row=row, field=f"{where}.content")
        if role == "tool" and not _follows_assistant(out):
            raise ChatSFTError(
                "a tool message must answer an assistant message's call",
                source=source,
                row=row,
                field=where,
                hint="put the assistant message with the call before it, or drop the tool message",
            )
        # Arrow fills absent keys of a struct column with None; templates test keys with `in`.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _type_names(value: Any) -> str:
    """`str`, or `list of int, str` for a list: what a value is, for an error message."""
    if isinstance(value, list) and value:
        return "list of " + ", ".join(sorted({type(v).__name__ for v in value}))
    return type(value).__name__


def _follows_assistant(previous: list[dict]) -> bool:
    """Tool results answer the last non-tool message, which must be the assistant's. Its call may
    be structured `tool_calls` or written in its text (Glaive's layout), so either is accepted."""
    for m in reversed(previous):
        if m["role"] != "tool":
            return m["role"] == "assistant"
    return False


def _check_text(value: Any, row: int, field: str, source: str | None) -> str:
    if not isinstance(value, str):
        raise ChatSFTError(
            f"expected a string, got {type(value).__name__}", source=source, row=row, field=field
        )
    if not value.strip():
        raise ChatSFTError("is empty", source=source, row=row, field=field)
    return value


def normalize(
    row: Mapping[str, Any],
    fmt: str,
    *,
    row_index: int,
    source: str | None = None,
    dataset_text_field: str = "text",
    prompt_template: str | None = None,
) -> Example:
    """Turn one raw row into a validated Example."""
    # The columns a chat format reads may be nested (messages, tool calls, schemas): their depth is
    # checked before anything walks them recursively (a template's tojson, pyarrow).
    for name in _NESTED_COLUMNS.get(fmt, ()):
        value = row.get(name)
        if isinstance(value, _CONTAINERS):
            check_depth(value, row_index, name, source)
    if fmt == "sharegpt":
        row = {"messages": _sharegpt_messages(row.get("conversations"), row_index, source)}
        fmt = "messages"
    if fmt == "query_response":
        return _query_response(row, prompt_template, row_index, source)
    if fmt == "tokenized":
        return _tokenized(row, row_index, source)
    if fmt == "text":
        return Text(_check_text(row.get(dataset_text_field), row_index, dataset_text_field, source))
    if fmt == "messages":
        msgs = check_messages(row.get("messages"), row_index, "messages", source)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChatSFTError(
                "conversation has no assistant turn, so nothing would be trained",
                source=source,
                row=row_index,
                field="messages",
                hint="add an assistant message or remove the row",
            )
        return Conversation(msgs, *_template_inputs(row, row_index, source))
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = check_messages(prompt, row_index, "prompt", source)
            c = check_messages(completion, row_index, "completion", source)
            return PromptCompletion(p, c, *_template_inputs(row, row_index, source))
        return PromptCompletion(
            _check_text(prompt, row_index, "prompt", source),
            _check_text(completion, row_index, "completion", source),
        )
    raise ChatSFTError(f"unknown dataset_format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


_TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")
_NESTED_COLUMNS = {
    "messages": ("messages", *_TEMPLATE_COLUMNS),
    "sharegpt": ("conversations", *_TEMPLATE_COLUMNS),
    "prompt_completion": ("prompt", "completion", *_TEMPLATE_COLUMNS),
}


def _template_inputs(
    row: Mapping[str, Any], row_index: int, source: str | None
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """A chat row's `tools` (JSON schemas, or one JSON string of them, as TRL accepts) and
    `chat_template_kwargs` (extra template variables)."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as err:
            raise ChatSFTError(
                f"tools is a string but not JSON ({err.msg} at character {err.pos})",
                source=source,
                row=row_index,
                field="tools",
                hint="give a list of JSON schemas, or a JSON string of one",
            ) from None
        except RecursionError:  # nested about 1,000 deep
            raise too_deep(row_index, "tools", source) from None
        if isinstance(tools, _CONTAINERS):  # the JSON string was not checked
            check_depth(tools, row_index, "tools", source)
    if tools and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatSFTError(
            f"tools must be a list of JSON schemas (objects), got {type(tools).__name__}",
            source=source,
            row=row_index,
            field="tools",
        )
    kwargs = row.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ChatSFTError(
            f"chat_template_kwargs must be a mapping of template variables, got "
            f"{type(kwargs).__name__}",
            source=source,
            row=row_index,
            field="chat_template_kwargs",
        )
    return (tools or None), (dict(kwargs) if kwargs else None)


def apply_formatting_func(
    row: Mapping[str, Any], formatting_func: Callable[[Any], Any], row_index: int
) -> dict[str, Any]:
    """A TRL formatting_func returns a string (text) or a list of messages (chat)."""
    out = formatting_func(dict(row))
    if isinstance(out, list) and len(out) == 1 and isinstance(out[0], str):
        out = out[0]  # older TRL formatting funcs return a one-element list
    if isinstance(out, str):
        return {"text": out}
    if isinstance(out, list):
        return {"messages": out}
    raise ChatSFTError(
        f"formatting_func returned {type(out).__name__}",
        row=row_index,
        hint="return a string or a list of {role, content} messages",
    )


def _sharegpt_messages(turns: Any, row: int, source: str | None) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise ChatSFTError(
            "expected a non-empty list of {from, value} turns",
            source=source,
            row=row,
            field="conversations",
        )
    out = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, Mapping) else None
        if speaker not in SHAREGPT_ROLES:
            raise ChatSFTError(
                f"unknown speaker {speaker!r}",
                source=source,
                row=row,
                field=f"conversations[{i}].from",
                hint=f"speakers are {', '.join(sorted(SHAREGPT_ROLES))}",
            )
        out.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return out


def _query_response(
    row: Mapping[str, Any], template: str | None, row_index: int, source: str | None
) -> PromptCompletion:
    query = _check_text(row.get("query"), row_index, "query", source)
    response = _check_text(row.get("response"), row_index, "response", source)
    if template is None:
        # No prompt template: a one-turn chat through the tokenizer's chat template.
        return PromptCompletion(
            [{"role": "user", "content": query}], [{"role": "assistant", "content": response}]
        )
    head, _, tail = template.partition("{response}")
    values = {**row, "query": query, "response": response}
    try:
        return PromptCompletion(head.format(**values), response + tail.format(**values))
    except (KeyError, IndexError, ValueError) as err:
        raise ChatSFTError(
            f"prompt_template {template!r} could not be filled ({type(err).__name__}: {err})",
            source=source,
            row=row_index,
            field="prompt_template",
            hint="use {query}, {response} or other column names in braces",
        ) from None


def _int_array(value: Any) -> array | None:
    """`value` as 64-bit integers, or None if it is not a list of integers. array() checks every
    item in C: no Python loop over the tokens."""
    if not isinstance(value, list):
        return None
    try:
        return array("q", value)
    except (TypeError, OverflowError):
        return None


def _tokenized(row: Mapping[str, Any], row_index: int, source: str | None) -> Tokenized:
    ids = row.get("input_ids")
    checked = _int_array(ids)
    if not checked:
        raise ChatSFTError(
            "expected a non-empty list of token ids",
            source=source,
            row=row_index,
            field="input_ids",
        )
    if min(checked) < 0:  # an embedding lookup would fail mid-training, naming no row
        raise ChatSFTError(
            f"token id {min(checked)} is negative",
            source=source,
            row=row_index,
            field="input_ids",
        )
    labels = row.get("labels")
    if labels is not None:
        name = "labels"  # used as given, as TRL does (they may differ from input_ids)
        _check_labels(labels, row_index, source)
    else:
        for name in ("completion_mask", "assistant_masks", "trained_mask"):
            mask = row.get(name)
            if mask is not None:
                if not isinstance(mask, list):
                    raise ChatSFTError(
                        f"expected a list of 0/1 flags, got {type(mask).__name__}",
                        source=source,
                        row=row_index,
                        field=name,
                    )
                labels = [t if m else -100 for t, m in zip(ids, mask)]
                if len(mask) != len(ids):
                    labels = mask  # reported below
                break
        else:
            labels, name = list(ids), "input_ids"
    if len(labels) != len(ids):
        raise ChatSFTError(
            f"has {len(labels)} entries but input_ids has {len(ids)}",
            source=source,
            row=row_index,
            field=name,
        )
    return Tokenized(list(ids), list(labels))


def _check_labels(labels: Any, row_index: int, source: str | None) -> None:
    """Labels are token ids, or -100 where nothing is trained; any other negative value makes the
    loss fail mid-training (an index error, or a device-side assert on a GPU)."""
    checked = _int_array(labels)
    if checked is None:
        raise ChatSFTError(
            f"expected a list of token ids and -100, got {_type_names(labels)}",
            source=source,
            row=row_index,
            field="labels",
        )
    if checked and min(checked) < 0:
        values = np.frombuffer(checked, dtype=np.int64)
        bad = values[(values < 0) & (values != -100)]
        if bad.size:
            raise ChatSFTError(
                f"label {bad[0]} is neither a token id nor -100 (not trained)",
                source=source,
                row=row_index,
                field="labels",
            )
