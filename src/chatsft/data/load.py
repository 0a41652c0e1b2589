"""Load training data: local JSON/JSONL/CSV/Parquet files or folders, or hub dataset ids."""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import datasets
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
from datasets.exceptions import DatasetGenerationError

from ..errors import ChatSFTError
from .formats import MAX_DEPTH, check_depth, too_deep

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_jsonl(path: Path) -> None:
    """datasets' JSON reader reports a broken line as a pyarrow error with no line number, so every
    line is read here first (json.loads, in C): each problem is named by line (the row) and byte.
    Values nested too deep for pyarrow are named when it fails (read_error), shallower ones too deep
    for chatsft when rows are normalized: no second pass over every line here.
    Only "\\n" ends a line, as for pyarrow; a byte-order mark (Windows editors) is skipped, as
    pyarrow skips it."""
    rows = 0
    try:
        with path.open(encoding="utf-8-sig", newline="\n") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                rows += 1
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    byte = _line_start(path, lineno) + _byte_index(line, err.pos)
                    raise ChatSFTError(
                        f"malformed JSON at column {err.colno} (byte {byte}): "
                        + _json_problem(err),
                        source=str(path),
                        row=lineno,
                        hint="each line must be one JSON object",
                    ) from None
                except RecursionError:  # nested about 1,000 deep: json's C parser gives up
                    _, field = _locate(line, outer=1, depth_limit=MAX_DEPTH)
                    raise too_deep(lineno, field, str(path)) from None
                if not isinstance(value, dict):
                    raise ChatSFTError(
                        f"expected a JSON object, got {type(value).__name__}",
                        source=str(path),
                        row=lineno,
                    )
    except UnicodeDecodeError:
        # The decoder's position is within its read-ahead block: find the line and byte.
        raise _first_undecodable_line(path) from None
    if not rows:
        raise ChatSFTError("file has no rows, only blank lines", source=str(path), field="dataset")


def _line_start(path: Path, lineno: int) -> int:
    """The byte offset in the file where line `lineno`'s text starts (after a byte-order mark)."""
    offset = 0
    with path.open("rb") as f:
        for _, raw in zip(range(lineno - 1), f):
            offset += len(raw)
        if lineno == 1 and f.read(len(codecs.BOM_UTF8)) == codecs.BOM_UTF8:
            offset += len(codecs.BOM_UTF8)
    return offset


def _first_undecodable_line(path: Path) -> ChatSFTError:
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            bom = len(codecs.BOM_UTF8) if lineno == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                raw[bom:].decode("utf-8")
            except UnicodeDecodeError as err:
                return _not_utf8(path, offset + bom + err.start, err, row=lineno)
            offset += len(raw)
    return ChatSFTError("not UTF-8 text", source=str(path), hint="re-encode the file as UTF-8")


def _byte_index(text: str, pos: int) -> int:
    """The byte offset in UTF-8 of the character at `pos`."""
    return len(text[:pos].encode("utf-8", "surrogatepass"))


def _json_problem(err: json.JSONDecodeError) -> str:
    """json's message without its trailing "at" ("Unterminated string starting at"): the position
    is given before it."""
    return err.msg.removesuffix(" starting at").removesuffix(" at")


def _not_utf8(
    path: Path,
    byte: int,
    err: UnicodeDecodeError,
    *,
    row: int | None = None,
    line: int | None = None,
) -> ChatSFTError:
    """The file's first byte that is not UTF-8, at offset `byte`: in JSON Lines row `row`, in other
    files on line `line`."""
    where = f"line {line}, byte {byte}" if line is not None else f"byte {byte}"
    return ChatSFTError(
        f"not UTF-8 text ({err.reason} at {where})",
        source=str(path),
        row=row,
        hint="re-encode the file as UTF-8",
    )


# A JSON text's tokens for _locate: strings (with escapes), brackets, commas and colons. Numbers,
# true, false and null are skipped over.
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[][{},:]')


def _locate(
    text: str, *, outer: int, stop: int | None = None, depth_limit: int | None = None
) -> tuple[int | None, str | None]:
    """(row, field) in a JSON text at character `stop`, or where a row value first nests deeper
    than `depth_limit`. `outer` levels enclose a row's fields: 1 for a JSON Lines line (the row
    object), 2 for a JSON array file (the array, whose items are the rows, then the row object).
    A scan of the text's tokens: it works where json cannot parse (a truncated or too deep text),
    and is only run to explain an error."""
    stack: list[list[Any]] = []  # per open bracket: [is_object, index or key, expecting a key]
    for match in _JSON_TOKEN.finditer(text):
        if stop is not None and match.start() >= stop:
            break
        token = match.group()
        head = token[0]
        if head in "[{":
            stack.append([head == "{", 0 if head == "[" else None, head == "{"])
            if depth_limit is not None and len(stack) - outer > depth_limit:
                break
        elif head in "]}":
            if stack:
                stack.pop()
        elif head == ",":
            if stack and stack[-1][0]:
                stack[-1][2] = True
            elif stack:
                stack[-1][1] += 1
        elif head == ":":
            if stack:
                stack[-1][2] = False
        elif stack and stack[-1][0] and stack[-1][2]:
            stack[-1][1] = token[1:-1]  # a key
    row = None
    if outer == 2 and stack and not stack[0][0]:
        row = stack[0][1] + 1
    record = stack[outer - 1] if len(stack) >= outer else None
    field = record[1] if record and record[0] and len(stack) > outer else None
    return row, field


def _diagnose(path: Path) -> ChatSFTError | None:
    """What is wrong with a data file that datasets could not read, named by row, line or byte;
    None if nothing is found here. Reads the whole file: only run after a failure."""
    if path.suffix not in (".json", ".jsonl", ".csv"):
        return None
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        byte = bom + err.start
        return _not_utf8(path, byte, err, line=data.count(b"\n", 0, byte) + 1)
    try:
        if path.suffix == ".csv":
            return _diagnose_csv(path, text)
        if path.suffix == ".json":
            return _diagnose_json(path, text, bom)
        return _diagnose_lines(path, text)
    except ChatSFTError as err:  # check_depth's
        return err


def _diagnose_json(path: Path, text: str, bom: int) -> ChatSFTError | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _diagnose_lines(path, text)  # JSON Lines in a .json file (datasets reads them)
        row, _ = _locate(text, outer=2, stop=err.pos)
        return ChatSFTError(
            f"malformed JSON at line {err.lineno}, column {err.colno} "
            f"(byte {bom + _byte_index(text, err.pos)}): {_json_problem(err)}",
            source=str(path),
            row=row,
        )
    except RecursionError:
        row, field = _locate(text, outer=2, depth_limit=MAX_DEPTH)
        return too_deep(row, field, str(path))
    if not isinstance(value, list):
        return None
    for row, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            return ChatSFTError(
                f"expected a JSON object, got {type(item).__name__}", source=str(path), row=row
            )
        problem = _row_problem(path, item, row)
        if problem:
            return problem
    return None


def _diagnose_lines(path: Path, text: str) -> ChatSFTError | None:
    """JSON Lines that json reads but pyarrow does not: a key twice in one object, a lone UTF-16
    surrogate escape ("\\ud800"), a value nested too deep."""
    # Split at "\n" only, as pyarrow: str.splitlines also splits at characters valid inside JSON
    # strings (U+2028), which would miscount the lines.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as err:
            return ChatSFTError(
                f"malformed JSON at column {err.colno}: {_json_problem(err)}",
                source=str(path),
                row=lineno,
            )
        except _DuplicateKey as dup:
            return ChatSFTError(
                f"the key {dup.args[0]!r} appears twice in one object",
                source=str(path),
                row=lineno,
                hint="keep one of them",
            )
        except RecursionError:
            _, field = _locate(line, outer=1, depth_limit=MAX_DEPTH)
            return too_deep(lineno, field, str(path))
        if isinstance(value, dict):
            problem = _row_problem(path, value, lineno)
            if problem:
                return problem
    return None


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _row_problem(path: Path, row: dict[str, Any], number: int) -> ChatSFTError | None:
    for key, value in row.items():
        check_depth(value, number, key, str(path))
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return ChatSFTError(
                "a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its "
                "pair), which is not a character",
                source=str(path),
                row=number,
                field=key,
            )
    return None


def _diagnose_csv(path: Path, text: str) -> ChatSFTError | None:
    """Rows with more fields than the header (pandas: "Expected 2 fields in line 3, saw 3"), and
    quotes never closed. Rows are counted as datasets counts them: blank lines skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    row, line = 0, 1
    try:
        header = next(reader, [])
        line = reader.line_num + 1
        for fields in reader:
            if fields:
                row += 1
                if len(fields) > len(header):
                    return ChatSFTError(
                        f"{len(fields)} fields but the header has {len(header)} (line {line})",
                        source=str(path),
                        row=row,
                        hint="quote fields that hold commas",
                    )
            line = reader.line_num + 1
    except csv.Error as err:
        problem = "a quote is never closed" if "end of data" in str(err) else str(err)
        return ChatSFTError(
            f"malformed CSV at line {line}: {problem}", source=str(path), row=row + 1
        )
    return None


def _columns(path: Path) -> list[str] | None:
    """A data file's column names (all keys of a JSON file's rows); None if it cannot be read."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return sorted(pq.read_schema(path).names)
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".csv":
            return sorted(next(csv.reader(io.StringIO(text, newline="")), []))
        if path.suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.split("\n") if line.strip()]
        return sorted({key for row in rows if isinstance(row, dict) for key in row})
    except (OSError, ValueError, RecursionError):
        return None


class _ReadFailureLogs(logging.Filter):
    """datasets' readers log "Failed to read file ... with error ..." and then raise the error that
    read_error explains in one line; while chatsft reads (`active`), that log line is dropped so it
    does not stand beside chatsft's own."""

    active = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            self.active
            and record.levelno >= logging.ERROR
            and record.getMessage().startswith("Failed to")
        )


QUIET_READ_FAILURES = _ReadFailureLogs()
for _reader in ("csv.csv", "json.json", "parquet.parquet"):
    logging.getLogger(f"datasets.packaged_modules.{_reader}").addFilter(QUIET_READ_FAILURES)


def read_error(err: Exception, files: Iterable[str], source: str | None) -> ChatSFTError:
    """datasets' error reading `files` (at load, or while streaming them) as one line that names
    the file and the row, line or byte: its own message is "An error occurred while generating the
    dataset", the cause hidden in the exception chain."""
    if isinstance(err, ChatSFTError):
        return err
    paths = [Path(f) for f in files if Path(f).is_file()]  # local ones: a stream's may be URLs
    cause = err
    if isinstance(err, DatasetGenerationError) and err.__cause__ is not None:
        cause = err.__cause__
    if "column names don't match" in str(cause) and len(paths) > 1:
        first = _columns(paths[0])
        for path in paths[1:]:
            columns = _columns(path)
            if first is not None and columns is not None and columns != first:
                return ChatSFTError(
                    f"its columns {columns} differ from {paths[0].name}'s {first}",
                    source=str(path),
                    hint="every file of a split must have the same columns",
                )
    for path in paths:
        found = _diagnose(path)
        if found is not None:
            return found
    text = str(cause).strip().splitlines()
    return ChatSFTError(
        f"could not read the data: {text[0] if text else type(cause).__name__}",
        source=source,
        field="dataset",
    )


def _split_names(split: str) -> list[str]:
    """The split names in a datasets split string: `train`, `train[:100]`, `train+validation`."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _folder_splits(folder: Path) -> dict[str, list[Path]]:
    """Assign a folder's data files to splits by their names, with datasets' own rules (what
    `datasets.load_dataset(folder)` does): train/training, test/testing/eval/evaluation,
    validation/valid/dev/val in a file or sub-folder name. A folder with no such names is all
    "train"; files beside split-named ones that match no split are left out, as datasets does."""
    try:
        patterns = get_data_patterns(str(folder))
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except (EmptyDatasetError, FileNotFoundError):  # an empty folder, or only hidden files
        return {}
    splits = {
        str(name): sorted(Path(f) for f in files if Path(f).suffix in BUILDERS)
        for name, files in resolved.items()
    }
    return {name: files for name, files in splits.items() if files}


def _local_files(path: Path, split: str) -> tuple[str, dict[str, list[str]]]:
    """The builder name and {split: files} for the splits named in `split`, each file checked."""
    names = _split_names(split)
    if path.is_file():
        # A single file is the train split, as datasets names it; reusing it for any other split
        # would silently evaluate on the training rows.
        splits = {"train": [path]}
    else:
        splits = _folder_splits(path)
        if not splits:
            raise ChatSFTError(
                "no .jsonl, .json, .csv or .parquet files found", source=str(path), field="dataset"
            )
    missing = [name for name in names if name not in splits]
    if missing and path.is_file():
        raise ChatSFTError(
            f"a single file is the 'train' split, so it has no {missing[0]!r} split",
            source=str(path),
            hint="give the other split as eval_dataset, or use eval_fraction",
        )
    if missing:
        raise ChatSFTError(
            f"no {missing[0]!r} split; splits found: {', '.join(sorted(splits))}",
            source=str(path),
            hint="files go to splits by name (train*, test*/eval*, validation*/valid*/dev*); "
            "set dataset_split / eval_split to a split found",
        )
    files = [p for name in dict.fromkeys(names) for p in splits[name]]
    kinds = {BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise ChatSFTError(
            f"cannot load files of type {sorted(p.suffix for p in files)}",
            source=str(path),
            field="dataset",
            hint="use .jsonl, .json, .csv or .parquet files, all of one type",
        )
    for p in files:
        if p.stat().st_size == 0:
            raise ChatSFTError("file is empty", source=str(p), field="dataset")
        if p.suffix == ".jsonl":
            _check_jsonl(p)
    return kinds.pop(), {name: [str(p) for p in splits[name]] for name in dict.fromkeys(names)}


def _flat(files: dict[str, list[str]]) -> list[str]:
    return [f for split_files in files.values() for f in split_files]


def load_data(
    spec: str, split: str = "train", streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """A local file or folder, or a hub dataset id (`name` or `name:config`). With `streaming`,
    rows are read lazily (train with max_steps; chatsft packs them as they arrive). A folder's
    files are split by their names as datasets does; a single file is the train split."""
    path = Path(os.path.expanduser(spec))
    if path.exists():
        builder, files = _local_files(path, split)
        QUIET_READ_FAILURES.active += 1
        try:
            # Only the requested splits' files: the others are neither read nor converted.
            return datasets.load_dataset(
                builder, data_files=files, split=split, streaming=streaming
            )
        except ValueError as err:
            if "corresponds to no data" not in str(err):
                raise read_error(err, _flat(files), str(path)) from err
            if "[" in split:  # train[:0], train[50%:50%]
                raise ChatSFTError(
                    f"the split {split!r} selects no rows", source=str(path)
                ) from None
            what = "file" if path.is_file() else f"the {split!r} split"
            raise ChatSFTError(f"{what} has no rows", source=str(path), field="dataset") from None
        except Exception as err:  # pyarrow and pandas errors, wrapped by datasets
            raise read_error(err, _flat(files), str(path)) from err
        finally:
            QUIET_READ_FAILURES.active -= 1
    if spec.startswith((".", "/", "~")) or path.suffix in BUILDERS:
        raise ChatSFTError("file or folder not found", source=spec, field="dataset")
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming)
    except Exception as err:  # offline, unknown id, missing split
        raise ChatSFTError(
            f"could not load it as a local path or hub dataset ({type(err).__name__}: {err})",
            source=spec,
            field="dataset",
            hint="check the path, or the hub id and your network",
        ) from None


def split_eval(
    dataset: datasets.Dataset, eval_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    if not 0 < eval_fraction < 1:
        raise ChatSFTError(
            f"eval_fraction must be between 0 and 1, got {eval_fraction}", field="eval_fraction"
        )
    parts = dataset.train_test_split(test_size=eval_fraction, seed=seed)
    return parts["train"], parts["test"]


def dataset_spec(name: str, config: str | None) -> str:
    """load_data's spec for a dataset and its hub configuration ('name:config')."""
    return f"{name}:{config}" if config else name


Loader = Callable[[str, str, bool], Any]  # (spec, split, streaming) -> dataset


def train_and_eval(
    spec: str,
    *,
    train_split: str = "train",
    test_split: str = "test",
    streaming: bool = False,
    eval_dataset: str | None = None,
    eval_fraction: float | None = None,
    evaluate: bool = False,
    seed: int = 42,
    load: Loader | None = None,
) -> tuple[Any, Any | None]:
    """The train set and the eval set (None if the run does not evaluate), as `chatsft train`
    and `chatsft inspect` both choose them: a separate eval_dataset (its train split), else a
    held-out eval_fraction, else the test split when `evaluate` (eval_split named, or an
    eval_strategy that evaluates, as `trl sft` does). `load` replaces load_data (inspect reads
    only the first rows)."""
    load = load or (lambda s, split, stream: load_data(s, split, streaming=stream))
    train = load(spec, train_split, streaming)
    if eval_dataset:
        return train, load(eval_dataset, "train", False)
    if eval_fraction:
        if streaming:
            raise ChatSFTError(
                "eval_fraction cannot split a stream", field="eval_fraction", hint="use eval_split"
            )
        return split_eval(train, eval_fraction, seed)
    if evaluate:
        return train, load(spec, test_split, False)
    return train, None


def datasets_named(
    script: Any, *, seed: int = 42, eval_strategy: str = "no", load: Loader | None = None
) -> tuple[Any, Any | None]:
    """train_and_eval for the data a run's ScriptArguments name (read by attribute, so this
    package does not import the config): what `chatsft train` and `chatsft inspect` both load."""
    return train_and_eval(
        dataset_spec(script.dataset_name, script.dataset_config),
        train_split=script.dataset_train_split,
        test_split=script.dataset_test_split,
        streaming=script.dataset_streaming,
        eval_dataset=script.eval_dataset,
        eval_fraction=script.eval_fraction,
        evaluate=bool(script.eval_split) or eval_strategy != "no",  # IntervalStrategy: a str enum
        seed=seed,
        load=load,
    )
