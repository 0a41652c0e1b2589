"""Deterministic synthetic chat tasks small enough for a tiny model to learn in a minute on a CPU.

Every task maps a short string of letters or digits to another one by a fixed rule, so a model that
has learned the rule answers prompts it never saw, which held-out exact match measures. Payload
characters are one token each in the demo tokenizer, and every payload has the same length, so
each rule reads its input at fixed offsets from the answer; variable lengths need content-based
lookups that a tiny model takes several times longer to learn (upper-casing 3-5 letters trailed
reversing and sorting by far in our runs).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import datasets

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str  # the prompt is "<instruction>: <payload>"
    alphabet: str
    rule: Callable[[str], str]
    length: int = 4
    # Sorting with repeated digits needs counting, which a tiny model learns much more slowly
    # than the order of distinct digits (every miss in our runs had a repeat).
    distinct: bool = False

    def sample(self, rng: random.Random) -> str:
        if self.distinct:
            return "".join(rng.sample(self.alphabet, self.length))
        return "".join(rng.choice(self.alphabet) for _ in range(self.length))

    def num_payloads(self) -> int:
        n = len(self.alphabet)
        return math.perm(n, self.length) if self.distinct else n**self.length

    def prompt(self, payload: str) -> str:
        return f"{self.instruction}: {payload}"


TASKS: tuple[Task, ...] = (
    Task("reverse", "reverse", LETTERS, lambda s: s[::-1]),
    Task("sort", "sort", DIGITS, lambda s: "".join(sorted(s)), distinct=True),
    Task("upper", "upper", LETTERS, str.upper),
)

# Whole words the demo tokenizer keeps as single tokens (build_assets.py adds them). A payload equal
# to one of them would be one token instead of one per character, so payloads never are.
WORDS: tuple[str, ...] = ("system", "user", "assistant", *(t.instruction for t in TASKS))


def chat(task: Task, payload: str) -> dict[str, list[dict[str, str]]]:
    """One training row: the user asks, the assistant answers with the rule applied."""
    return {
        "messages": [
            {"role": "user", "content": task.prompt(payload)},
            {"role": "assistant", "content": task.rule(payload)},
        ]
    }


def _split_counts(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def make_rows(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows, balanced over TASKS, with no prompt in both.

    The held-out prompts are drawn first and then excluded, so the held-out part does not depend
    on num_train: quick and full runs are scored on the same examples.
    """
    counts = list(
        zip(TASKS, _split_counts(num_train, len(TASKS)), _split_counts(num_eval, len(TASKS)))
    )
    for task, n_train, n_eval in counts:
        if n_train + n_eval > 0.9 * task.num_payloads():
            # Rejection sampling below would crawl (or never end) near the size of the space.
            raise ValueError(
                f"{n_train + n_eval} {task.name} rows asked for, but only "
                f"{task.num_payloads()} distinct prompts exist; ask for at most 90% of that"
            )
    train: list[dict] = []
    held_out: list[dict] = []
    for task, n_train, n_eval in counts:
        # One generator per task (string seeds hash deterministically), so the rows of one task
        # do not shift when another task draws more.
        rng = random.Random(f"{seed}:{task.name}")
        seen: set[str] = set()
        for out, n in ((held_out, n_eval), (train, n_train)):
            while n > 0:
                payload = task.sample(rng)
                if payload in seen or payload in WORDS:
                    continue
                seen.add(payload)
                out.append(chat(task, payload))
                n -= 1
    # Interleave the tasks so every packed row holds all of them.
    random.Random(f"{seed}:shuffle").shuffle(train)
    return train, held_out


def make_datasets(
    num_train: int, num_eval: int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The rows of `make_rows` as `datasets.Dataset`s with one `messages` column."""
    train, held_out = make_rows(num_train, num_eval, seed)
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held_out)
