"""Detect a row's format and normalise it to one of Text, Conversation or PromptCompletion.

Validation happens here, once, so every later stage can trust its input. Errors name the row and field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ChatSFTError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("text", "messages", "prompt_completion")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class PromptCompletion:
    """`prompt`/`completion` are both strings, or both lists of messages."""

    prompt: str | list[dict[str, Any]]
    completion: str | list[dict[str, Any]]


Example = Text | Conversation | PromptCompletion


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
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if dataset_text_field in cols:
        return "text"
    raise ChatSFTError(
        f"cannot tell the data format from the columns {sorted(cols)}",
        hint=(
            f"expected a '{dataset_text_field}' column (text; see dataset_text_field), a 'messages' "
            "column (chat), or 'prompt' and 'completion' columns; or pass formatting_func"
        ),
    )


def _check_messages(messages: Any, row: int, field: str, source: str | None) -> list[dict]:
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
        has_calls = bool(m.get("tool_calls"))
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
        if content is not None and not content.strip() and not has_calls:
            raise ChatSFTError("content is empty", source=source, row=row, field=f"{where}.content")
        # Arrow fills absent keys of a struct column with None; templates test keys with `in`.
        out.append({k: v for k, v in m.items() if v is not None})
    return out


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
) -> Example:
    """Turn one raw row into a validated Example."""
    if fmt == "text":
        return Text(_check_text(row.get(dataset_text_field), row_index, dataset_text_field, source))
    if fmt == "messages":
        msgs = _check_messages(row.get("messages"), row_index, "messages", source)
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChatSFTError(
                "conversation has no assistant turn, so nothing would be trained",
                source=source,
                row=row_index,
                field="messages",
                hint="add an assistant message or remove the row",
            )
        tools = row.get("tools")
        return Conversation(msgs, tools if tools else None)
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _check_messages(prompt, row_index, "prompt", source)
            c = _check_messages(completion, row_index, "completion", source)
            return PromptCompletion(p, c)
        return PromptCompletion(
            _check_text(prompt, row_index, "prompt", source),
            _check_text(completion, row_index, "completion", source),
        )
    raise ChatSFTError(f"unknown dataset_format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


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
