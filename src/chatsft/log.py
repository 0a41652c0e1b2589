"""chatsft's log: one `chatsft` logger, under transformers' conventions.

Messages about a run (data counts, the attention kernel, skipped steps, the report) are INFO lines
prefixed "[chatsft]" on stdout. `TRANSFORMERS_VERBOSITY` (or `CHATSFT_VERBOSITY`) and SFTConfig's
`log_level` set the level, as for transformers' own messages; `logging.getLogger("chatsft")` takes
other handlers. Lines go through `tqdm.write`, so a line written during a progress bar does not land
on the bar. Command output (tables, generations) is printed by the CLI, not logged.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("chatsft")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _ProgressBarHandler(logging.Handler):
    """Writes to the current sys.stdout (looked up per line, so redirection and capture work),
    through tqdm.write while a bar is on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # a log line must never end a run
            self.handleError(record)


def _setup() -> None:
    if logger.handlers:
        return
    handler = _ProgressBarHandler()
    handler.setFormatter(logging.Formatter("[chatsft] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    env = os.environ.get("CHATSFT_VERBOSITY") or os.environ.get("TRANSFORMERS_VERBOSITY")
    logger.setLevel(LEVELS.get((env or "info").lower(), logging.INFO))


def set_verbosity(level: str | None) -> None:
    """A transformers log level name (SFTConfig.log_level); 'passive' leaves it as it is."""
    if level and level.lower() in LEVELS:
        logger.setLevel(LEVELS[level.lower()])


_setup()
