"""Generation with a trained model: one job per module.

    knobs.py     the decoding knob table and every check that needs no model (torch-free)
    generate.py  generate(), its results, load_for_inference(), streaming
    chat.py      ChatSession and the chat REPL
    callback.py  sample generations during evaluation (SFTConfig.generation_eval)
    cli.py       `chatsft generate` / `chatsft chat`: argument dataclasses, parsers, run functions

Names are imported on first use, so `import chatsft.generation.knobs` (and the CLI's flag checks)
never pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "knobs": [
        "ALIASES",
        "DEFAULT_MAX_NEW_TOKENS",
        "DTYPES",
        "KNOBS",
        "Knob",
        "Prompt",
        "check_dtype",
        "check_generation_eval",
        "check_knobs",
        "fit_lengths",
    ],
    "generate": [
        "Generation",
        "GenerationResult",
        "ReplyStreamer",
        "check_device",
        "check_prompt",
        "check_weights",
        "conversation_prompt",
        "generate",
        "load_for_inference",
        "model_context",
    ],
    "chat": ["ChatSession", "run_repl"],
    "callback": [
        "GENERATIONS_FILE",
        "GenerationEvalCallback",
        "eval_prompts",
        "generation_eval_callback_from_config",
    ],
    "cli": [
        "ChatArguments",
        "GenerateArguments",
        "build_chat_parser",
        "build_generate_parser",
        "run_chat",
        "run_generate",
    ],
}
_MODULE_OF = {name: f".{module}" for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "ALIASES",
    "ChatArguments",
    "ChatSession",
    "DEFAULT_MAX_NEW_TOKENS",
    "DTYPES",
    "GENERATIONS_FILE",
    "GenerateArguments",
    "Generation",
    "GenerationEvalCallback",
    "GenerationResult",
    "KNOBS",
    "Knob",
    "Prompt",
    "ReplyStreamer",
    "build_chat_parser",
    "build_generate_parser",
    "check_device",
    "check_dtype",
    "check_generation_eval",
    "check_knobs",
    "check_prompt",
    "check_weights",
    "conversation_prompt",
    "eval_prompts",
    "fit_lengths",
    "generate",
    "generation_eval_callback_from_config",
    "load_for_inference",
    "model_context",
    "run_chat",
    "run_generate",
    "run_repl",
]
__getattr__, __dir__ = lazy_exports(__name__, _MODULE_OF)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on demand
    from .callback import (
        GENERATIONS_FILE,
        GenerationEvalCallback,
        eval_prompts,
        generation_eval_callback_from_config,
    )
    from .chat import ChatSession, run_repl
    from .cli import (
        ChatArguments,
        GenerateArguments,
        build_chat_parser,
        build_generate_parser,
        run_chat,
        run_generate,
    )
    from .generate import (
        Generation,
        GenerationResult,
        ReplyStreamer,
        check_device,
        check_prompt,
        check_weights,
        conversation_prompt,
        generate,
        load_for_inference,
        model_context,
    )
    from .knobs import (
        ALIASES,
        DEFAULT_MAX_NEW_TOKENS,
        DTYPES,
        KNOBS,
        Knob,
        Prompt,
        check_dtype,
        check_generation_eval,
        check_knobs,
        fit_lengths,
    )
