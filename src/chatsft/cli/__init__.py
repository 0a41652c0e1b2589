"""`chatsft COMMAND ...`: one module per command, imported only when that command runs, so
`chatsft --help` and a mistyped command answer at once. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import difflib
import importlib
import sys
import traceback

from ..errors import ChatSFTError

# command → (module under chatsft.cli, one-line help)
COMMANDS = {
    "train": ("train", "train from a YAML config (TRL's `trl sft` keys) and --field flags"),
    "generate": ("generate", "generate replies for prompts with a saved model or adapter"),
    "chat": ("chat", "chat with a saved model or adapter in the terminal"),
    "estimate": ("estimate", "predict peak memory and checkpoint sizes; fit the batch to memory"),
    "inspect": ("inspect", "show what training will train on: tokens, masks, lengths, warnings"),
    "merge": ("merge", "merge a LoRA adapter into its base model (a standalone folder)"),
    "export": ("export", "write a model or adapter as a GGUF file (llama.cpp, Ollama, LM Studio)"),
    "import-gguf": ("import_gguf", "save a GGUF model once as a folder to train from"),
    "demo": ("demo", "train the bundled tiny model offline and show that it learned"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: chatsft [--debug] COMMAND [ARGS ...]",
        "",
        "Supervised fine-tuning of chat language models.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`chatsft COMMAND --help` lists every option of a command. --debug shows tracebacks.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            raise ChatSFTError(
                f"unknown command {name!r}",
                hint=f"did you mean '{close[0]}'?" if close else "see `chatsft --help`",
            )
        module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
        return module.run(rest)
    except (ChatSFTError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"chatsft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatsft: interrupted", file=sys.stderr)
        return 130
