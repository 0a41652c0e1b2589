"""`chatsft generate` and `chatsft chat` on the command line.

The options are dataclasses (GenerateArguments, ChatArguments) read by transformers'
HfArgumentParser, so the flags are TRL's: `--max_new_tokens`, with the dashed spelling
(`--max-new-tokens`) accepted too (HfArgumentParser adds it for every field with an underscore).
The model may be given as the first positional argument or as --model_name_or_path.

`run_generate` / `run_chat` print a ChatSFTError as one line and return exit code 2;
`cmd_generate` / `cmd_chat` are the same commands raising it. Torch and the model are imported only
when a command runs, so `--help` and flag errors answer without them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TextIO

from transformers import HfArgumentParser

from ..errors import ChatSFTError
from ..files import write_atomic
from .knobs import KNOBS, Prompt, check_dtype, check_knobs

# Fields that take one value per flag and may be repeated (`--prompt a --prompt b`), as before:
# HfArgumentParser gives list fields nargs="+", which would also swallow a positional MODEL that
# follows (`--prompt hi out/`).
REPEATABLE = ("prompt", "stop_strings")
POSITIONAL_MODEL = "positional_model"


def _knob(name: str, **argparse_options: Any) -> Any:
    """A decoding knob's field: unset (None) by default, so the model's generation_config decides."""
    return field(default=None, metadata={"help": KNOBS[name].help, **argparse_options})


@dataclass
class ModelArguments:
    """What `chatsft generate` and `chatsft chat` load, and how."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "model folder (or hub id), or a LoRA adapter folder; may also be given as "
            "the first positional argument",
            "aliases": ["--model"],
        },
    )
    dtype: str | None = field(
        default=None, metadata={"help": "weights dtype: float32, bfloat16, float16 or auto"}
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda when available)"}
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "a .jinja file or tokenizer folder whose chat template to use instead",
            "aliases": ["--chat_template", "--chat-template"],
        },
    )
    system: str | None = field(default=None, metadata={"help": "system message"})


@dataclass
class DecodingArguments:
    """The decoding knobs (unset: the model's generation_config decides)."""

    max_new_tokens: int | None = _knob("max_new_tokens")
    max_length: int | None = _knob("max_length")
    min_new_tokens: int | None = _knob("min_new_tokens")
    min_length: int | None = _knob("min_length")
    # A bare `--do_sample` means true, as the old store_true flag did; `--do_sample false` works too.
    do_sample: bool | None = _knob("do_sample", nargs="?", const=True)
    temperature: float | None = _knob("temperature")
    top_k: int | None = _knob("top_k")
    top_p: float | None = _knob("top_p")
    min_p: float | None = _knob("min_p")
    repetition_penalty: float | None = _knob("repetition_penalty")
    no_repeat_ngram_size: int | None = _knob("no_repeat_ngram_size")
    num_beams: int | None = _knob("num_beams")
    length_penalty: float | None = _knob("length_penalty")
    early_stopping: str | None = _knob("early_stopping")
    num_return_sequences: int | None = _knob("num_return_sequences")
    stop_strings: list[str] = field(
        default_factory=list,
        metadata={
            "help": KNOBS["stop_strings"].help + " (repeatable)",
            "aliases": ["--stop"],
            "action": "append",
            "metavar": "TEXT",
        },
    )
    seed: int | None = _knob("seed")

    def knobs(self) -> dict[str, Any]:
        """The knobs given on the command line (unset ones left out)."""
        values = {name: getattr(self, name) for name in KNOBS}
        return {k: v for k, v in values.items() if v is not None and v != []}


@dataclass
class GenerateArguments(DecodingArguments, ModelArguments):
    """`chatsft generate`: --prompt TEXT prints the answer; --input FILE.jsonl writes records."""

    prompt: list[str] = field(
        default_factory=list,
        metadata={"help": "a prompt (repeatable)", "action": "append", "metavar": "TEXT"},
    )
    input: str | None = field(default=None, metadata={"help": "JSONL file of prompts"})
    output: str | None = field(
        default=None, metadata={"help": "JSONL file to write (written atomically)"}
    )
    raw: bool = field(
        default=False,
        metadata={"help": "send text prompts as they are, without the chat template"},
    )
    batch_size: int = field(default=8, metadata={"help": "prompts generated together (default 8)"})


@dataclass
class ChatArguments(DecodingArguments, ModelArguments):
    """`chatsft chat`: one user turn per input line."""

    stream: bool = field(
        default=True,
        metadata={"help": "print replies as they are generated (--no_stream: when complete)"},
    )


GENERATE_DESCRIPTION = (
    "Generate with a trained model. --prompt TEXT prints the answer; --input "
    'FILE.jsonl (rows {"prompt": text or messages} or {"messages": [...]}) writes one JSONL '
    "record per row, with the generations and the knobs used, to --output (default stdout)."
)
CHAT_DESCRIPTION = (
    "Interactive chat with a model folder or LoRA adapter folder. Each input line is a user "
    "turn; the reply is printed as it is generated. Commands: /reset, /system TEXT, "
    "/set KNOB VALUE, /quit. On a terminal lines can be edited, and earlier ones recalled with "
    "the arrow keys (history in ~/.cache/chatsft/chat_history)."
)


class GenerationParser(HfArgumentParser):
    """HfArgumentParser with chatsft's error style and a positional MODEL.

    An error is a ChatSFTError (one line and exit code 2 from the dispatcher): the usage block
    argparse prints first would bury the message."""

    def __init__(self, dataclass_type: type, **kwargs: Any) -> None:
        # HfArgumentParser appends "(default: None)" to every help line; for knobs, None means
        # "the model's generation_config decides", which their help says once.
        kwargs.setdefault("formatter_class", argparse.HelpFormatter)
        super().__init__(dataclass_type, **kwargs)
        _finish_arguments(self)
        self._bool_flags = {
            option
            for action in self._actions
            if action.nargs == "?" and action.const is True
            for option in action.option_strings
        }

    def error(self, message: str) -> NoReturn:
        # The dispatcher prints ChatSFTError as one line and exits 2, as for every command.
        raise ChatSFTError(message, hint=f"see `{self.prog} --help`")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        # argparse %-formats help texts; field help is plain prose.
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = kwargs["help"].replace("%", "%%")
        return super().add_argument(*args, **kwargs)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = _bare_bool_flags(list(sys.argv[1:] if args is None else args), self._bool_flags)
        ns, rest = super().parse_known_args(args, namespace)
        problem = _merge_positional_model(ns)
        if problem:
            self.error(problem)
        return ns, rest

    def parse_args_into_dataclasses(
        self, args: Sequence[str] | None = None, return_remaining_strings: bool = False, **kwargs
    ) -> tuple[Any, ...]:
        # HfArgumentParser raises ValueError (a traceback) on leftover arguments; argparse's
        # own wording, through error(), keeps them one line and exit 2.
        *outputs, rest = super().parse_args_into_dataclasses(
            args, return_remaining_strings=True, **kwargs
        )
        if return_remaining_strings:
            return (*outputs, rest)
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return tuple(outputs)


def build_generate_parser() -> GenerationParser:
    """The parser for `chatsft generate ...`: `parse_args_into_dataclasses(argv)` gives
    `(GenerateArguments,)`; bad flags exit 2 with one line."""
    return GenerationParser(
        GenerateArguments, prog="chatsft generate", description=GENERATE_DESCRIPTION
    )


def build_chat_parser() -> GenerationParser:
    """The parser for `chatsft chat ...`: `parse_args_into_dataclasses(argv)` gives
    `(ChatArguments,)`; bad flags exit 2 with one line."""
    return GenerationParser(ChatArguments, prog="chatsft chat", description=CHAT_DESCRIPTION)


def _finish_arguments(parser: GenerationParser) -> None:
    for action in parser._actions:
        if action.dest in REPEATABLE:
            action.nargs = None  # one value per flag; see REPEATABLE
    parser.add_argument(
        POSITIONAL_MODEL,
        nargs="?",
        metavar="MODEL",
        help="model folder (or hub id), or a LoRA adapter folder (or --model_name_or_path)",
    )


BOOL_WORDS = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}  # string_to_bool's


def _bare_bool_flags(args: list[str], flags: set[str]) -> list[str]:
    """`--raw out/` means --raw, then MODEL: a bool flag (which takes an optional true/false) is
    given its value explicitly when the next word is not one, so it cannot swallow a positional."""
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        following = args[i + 1].lower() if i + 1 < len(args) else None
        out.append(f"{arg}=true" if arg in flags and following not in BOOL_WORDS else arg)
    return out


def _merge_positional_model(ns: argparse.Namespace) -> str | None:
    """Move a positional MODEL into model_name_or_path; the problem, if any, as a message."""
    positional = vars(ns).pop(POSITIONAL_MODEL, None)
    if positional is not None:
        if ns.model_name_or_path not in (None, positional):
            return "give the model once: as MODEL or as --model_name_or_path"
        ns.model_name_or_path = positional
    if getattr(ns, "model_name_or_path", None) is None:
        return "the following arguments are required: MODEL (or --model_name_or_path)"
    return None


# --- running ---------------------------------------------------------------------------------------


def run_generate(args: GenerateArguments, *, debug: bool = False) -> int:
    """`chatsft generate`: 0, or 2 after one `chatsft: error: ...` line on stderr."""
    return _one_line_errors(cmd_generate, args, debug)


def run_chat(
    args: ChatArguments,
    *,
    debug: bool = False,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """`chatsft chat` over stdin/stdout (default: the process's): 0, or 2 after one
    `chatsft: error: ...` line on stderr. Errors inside the session are printed and it goes on."""
    return _one_line_errors(lambda a: cmd_chat(a, stdin=stdin, stdout=stdout), args, debug)


def _one_line_errors(command: Callable[[Any], int], args: Any, debug: bool) -> int:
    try:
        return command(args)
    except (ChatSFTError, OSError) as err:  # bad input, or a file that cannot be read/written
        if debug:
            traceback.print_exc()
        message = " ".join(str(err).split("\n"))
        # The same prefix as every other chatsft command's errors.
        print(f"chatsft: error: {message}", file=sys.stderr)
        return 2


def _check_common(args: ModelArguments | GenerateArguments | ChatArguments) -> dict[str, Any]:
    """Checks that need no model, so a typo fails before the (slow) load."""
    knobs = args.knobs()
    check_knobs(knobs)
    check_dtype(args.dtype)
    if not args.model_name_or_path:
        raise ChatSFTError(
            "no model given", field="model_name_or_path", hint="give MODEL (a folder or hub id)"
        )
    return knobs


def cmd_generate(args: GenerateArguments) -> int:
    """`chatsft generate`, raising ChatSFTError on bad input."""
    knobs = _check_common(args)
    if bool(args.prompt) == bool(args.input):
        raise ChatSFTError("give --prompt or --input (one of them)", field="prompt")
    if args.batch_size < 1:
        raise ChatSFTError(f"must be >= 1, got {args.batch_size}", field="batch_size")
    if args.raw and "" in args.prompt:
        raise ChatSFTError(
            "is empty, and with --raw there is nothing to continue",
            field="prompt",
            hint="give some text, or drop --raw so it is a user turn",
        )
    from .generate import check_device, generate, load_for_inference

    device = check_device(args.device)
    rows = (
        [{"prompt": p} for p in args.prompt]
        if args.prompt
        else read_prompt_rows(args.input, args.raw)
    )
    model, tokenizer = load_for_inference(
        args.model_name_or_path,
        dtype=args.dtype,
        device=device,
        chat_template_path=args.chat_template_path,
    )
    prompts = [_as_prompt(row, tokenizer, args) for row in rows]
    results = generate(
        model, tokenizer, prompts, batch_size=args.batch_size, progress=bool(args.input), **knobs
    )
    if args.input or args.output:
        used = check_knobs(knobs)
        records = [_record(row, result, used) for row, result in zip(rows, results)]
        write_jsonl(args.output, records)
    else:
        from .chat import shown

        print("\n---\n".join(shown(g.text) for r in results for g in r.generations))
    return 0


def cmd_chat(
    args: ChatArguments, *, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    """`chatsft chat`, raising ChatSFTError on bad input (before the session starts)."""
    knobs = _check_common(args)
    from .chat import ChatSession, run_repl
    from .generate import check_device, load_for_inference

    device = check_device(args.device)
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    model, tokenizer = load_for_inference(
        args.model_name_or_path,
        dtype=args.dtype,
        device=device,
        chat_template_path=args.chat_template_path,
    )
    stream = stdout if args.stream else None
    session = ChatSession(model, tokenizer, knobs, system=args.system, stream=stream)
    return run_repl(session, stdin, stdout)


def read_prompt_rows(path: str, raw: bool = False) -> list[dict[str, Any]]:
    """Read and check every row before the (slow) model load, so a bad line fails fast."""
    from .generate import check_prompt, conversation_prompt

    if not os.path.isfile(path):
        raise ChatSFTError("file not found", source=path, field="input")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ChatSFTError(f"malformed JSON ({err.msg})", source=path, row=lineno) from None
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise ChatSFTError(
                    'expected an object with "prompt" or "messages"', source=path, row=lineno
                )
            key = "prompt" if "prompt" in row else "messages"
            prompt = check_prompt(row[key], row=lineno, source=path)
            if isinstance(prompt, list) and conversation_prompt(prompt) is None:
                raise ChatSFTError(
                    "nothing comes before the assistant turn", source=path, row=lineno, field=key
                )
            if raw and prompt == "":
                raise ChatSFTError(
                    "is empty, and with --raw there is nothing to continue",
                    source=path,
                    row=lineno,
                    field=key,
                )
            rows.append(row)
    if not rows:
        raise ChatSFTError("no prompts in the file", source=path, field="input")
    return rows


def _as_prompt(row: Mapping[str, Any], tokenizer: Any, args: GenerateArguments) -> Prompt:
    """Text prompts become a user turn when the tokenizer has a chat template (unless --raw)."""
    from .generate import conversation_prompt

    prompt = row["prompt"] if "prompt" in row else row["messages"]
    if isinstance(prompt, list):
        return conversation_prompt(prompt) or prompt
    if args.raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [*system, {"role": "user", "content": prompt}]


def _record(row: Mapping[str, Any], result: Any, knobs: dict[str, Any]) -> dict:
    return {
        **row,
        "prompt": result.prompt,
        "generations": [g.to_json() for g in result.generations],
        "knobs": knobs,
    }


def write_jsonl(path: str | None, records: list[dict[str, Any]]) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written file."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if path is None:
        sys.stdout.write(lines)
        return
    write_atomic(path, lines)
