"""One command-line surface for every command: transformers' HfArgumentParser over typed dataclasses.

A command's settings come from, in rising order: the dataclasses' defaults, a YAML file (the first
positional argument, or `--config FILE` as with `trl sft`), then `--field value` flags. Types and
choices are checked while parsing, before any model or data is loaded; a bad value is one line naming
the field (exit 2). Field names are TRL's (`--max_length`); dashed spellings and chatsft's older short
names (`--model`, `--dataset`) are aliases.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from ..errors import ChatSFTError

MAX_YAML_ALIASES = 100  # anchors/aliases per file: a nested alias bomb expands exponentially
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key")


# Settings other tools' configs use that chatsft does not offer: refused with the reason.
REFUSED = {
    "datasets": "dataset mixtures (TRL's `datasets:` list) are not supported: concatenate the "
    "sources into one file or folder and give it as dataset_name",
}


class CommandParser(HfArgumentParser):
    """An HfArgumentParser whose errors are one line (ChatSFTError) instead of a usage dump."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:
            # `bool | None` fields (bf16, padding_free) would need a value: a bare flag means true,
            # as it does for plain bool fields.
            if action.type is string_to_bool and action.nargs is None and not action.const:
                action.nargs, action.const = "?", True

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ChatSFTError(message, hint=f"see `{self.prog} --help`")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # argparse %-formats help texts; field help is plain prose ("50% of the rows").
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        return super().add_argument(*args, **kwargs)


@dataclass
class Parsed:
    """The dataclass instances, in the order the parser was built with, and what the user set."""

    values: tuple[Any, ...]
    source: str  # the YAML file, or "command line"
    record: dict[str, Any]  # every setting given in the file or on the command line, no secrets
    # bf16/fp16 as asked; with training=False the TrainingArguments were built without them
    mixed_precision: dict[str, bool] = dataclasses.field(default_factory=dict)


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader that refuses YAML with more than MAX_YAML_ALIASES aliases (a 'billion laughs'
    file would otherwise expand until memory runs out)."""

    aliases_seen = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen += 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name references)")
        return super().compose_node(parent, index)


def read_yaml(path: str) -> dict[str, Any]:
    """A config file's top-level mapping, with clear errors."""
    if not os.path.isfile(path):
        raise ChatSFTError("config file not found", source=path)
    with open(path, encoding="utf-8") as f:
        try:
            loaded = yaml.load(f, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as err:
            raise ChatSFTError(f"invalid YAML: {err}", source=path) from None
        except UnicodeDecodeError as err:
            raise ChatSFTError(f"not UTF-8 text ({err.reason})", source=path) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ChatSFTError("expected a mapping of settings at the top level", source=path)
    return {str(k): v for k, v in loaded.items()}


def split_config(argv: list[str], positional: bool) -> tuple[str | None, list[str]]:
    """The YAML path (`--config FILE`, `--config=FILE`, or a leading positional) and the rest."""
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == "--config":
            if i + 1 >= len(rest):
                raise ChatSFTError("--config needs a file", hint="--config path/to/config.yaml")
            path = rest[i + 1]
            del rest[i : i + 2]
            return path, rest
        if arg.startswith("--config="):
            del rest[i]
            return arg.split("=", 1)[1], rest
    if positional and rest and not rest[0].startswith("-"):
        return rest[0], rest[1:]
    return None, rest


def _names(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every spelling of every option (without dashes in front; inner dashes as underscores)."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            out[option.lstrip("-").replace("-", "_")] = action
    return out


def _unknown(key: str, names: dict[str, argparse.Action], source: str) -> ChatSFTError:
    if key in REFUSED:
        return ChatSFTError(REFUSED[key], source=source, field=key)
    close = difflib.get_close_matches(key, sorted(names), n=1)
    hint = f"did you mean '{close[0]}'?" if close else "see --help for every setting"
    return ChatSFTError("unknown setting", source=source, field=key, hint=hint)


def _mapping_fields(parser: HfArgumentParser) -> set[str]:
    """Fields annotated with a dict type: a YAML mapping goes to them as it is."""
    out = set()
    for cls in parser.dataclass_types:
        for name, hint in typing.get_type_hints(cls).items():
            if "dict" in str(hint):
                out.add(name)
    return out


def _yaml_default(
    action: argparse.Action, key: str, value: Any, source: str, mappings: set[str]
) -> Any:
    """A YAML value as the parser default for `action`: scalars become text, so argparse checks
    them with the field's own type exactly as it checks a flag."""
    is_bool = action.type is string_to_bool
    if is_bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool) and value is not None:
            raise ChatSFTError(f"expected true or false, got {value!r}", source=source, field=key)
        return value
    if value is None or isinstance(value, dict) and action.dest in mappings:
        return value  # dict-valued fields (model_init_kwargs) take a mapping as it is
    if isinstance(value, dict):
        raise ChatSFTError(f"expected a value, got a mapping {value!r}", source=source, field=key)
    if isinstance(value, bool):  # YAML 1.1 reads `no`/`off` as false: `save_strategy: no`
        return action.const if isinstance(action.const, str) and value else "yes" if value else "no"
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        convert = action.type or str
        try:
            return [convert(str(item)) for item in items]
        except (TypeError, ValueError):
            raise ChatSFTError(f"invalid list {value!r}", source=source, field=key) from None
    if isinstance(value, list):
        raise ChatSFTError(f"expected one value, got a list {value!r}", source=source, field=key)
    return str(value)


def _is_secret(name: str) -> bool:
    return name.endswith(SECRET_SUFFIXES) and name not in ("eos_token", "pad_token")


# Fields whose TrainingArguments checks look at this machine's hardware (bf16 needs a GPU or a
# recent CPU): commands that never train (inspect, estimate) must not fail on them.
HARDWARE_FIELDS = {"bf16": False, "fp16": False, "tf32": None}


def parse(
    parser: CommandParser,
    argv: list[str],
    *,
    positional_config: bool = True,
    training: bool = True,
) -> Parsed:
    """Parse `[CONFIG.yaml] [--config FILE] [--field value ...]` into the parser's dataclasses.
    `training=False`: TrainingArguments are built without bf16/fp16/tf32 (reported in
    Parsed.mixed_precision), so a GPU config can be inspected or estimated on a laptop."""
    path, rest = split_config(argv, positional_config)
    names = _names(parser)
    source = path or "command line"
    saved = [(action, action.default) for action in parser._actions]
    defaults: dict[str, Any] = {}
    for action, default in saved:  # argparse takes a dest's default from its first action
        defaults.setdefault(action.dest, default)
    if path is not None:
        mappings = _mapping_fields(parser)
        for key, value in read_yaml(path).items():
            action = names.get(key.replace("-", "_"))
            if action is None:
                raise _unknown(key, names, path)
            action.default = _yaml_default(action, key, value, path, mappings)
            action.required = False
    try:
        namespace, remaining = parser.parse_known_args(rest)
    finally:
        for action, default in saved:  # the parser can be used again with its own defaults
            action.default = default
    if remaining:
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        raise _unknown(flag.lstrip("-").split("=")[0].replace("-", "_"), names, "command line")
    values = []
    mixed = {}
    for cls in parser.dataclass_types:
        keys = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in vars(namespace).items() if k in keys}
        if not training and issubclass(cls, TrainingArguments):
            mixed = {k: bool(kwargs.get(k)) for k in ("bf16", "fp16")}
            kwargs.update(HARDWARE_FIELDS)
        try:
            values.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise ChatSFTError(f"invalid setting: {err}", source=source) from None
    record = {
        dest: value
        for dest, value in vars(namespace).items()
        if value != defaults.get(dest) and not _is_secret(dest)
    }
    return Parsed(tuple(values), source, record, mixed)
