"""Deterministic synthetic chat tasks small enough for a tiny model to learn in a minute on a CPU.

Every task maps a short string of letters or digits to another one by a fixed rule, so a model that
learns the rule answers examples it never saw exactly, and held-out exact match measures that. Each
character is one token in the demo tokenizer, so every rule is a simple function of token positions.
"""

from __future__ import annotations

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
    min_len: int = 3
    max_len: int = 5

    def sample(self, rng: random.Random) -> str:
        n = rng.randint(self.min_len, self.max_len)
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def prompt(self, payload: str) -> str:
        return f"{self.instruction}: {payload}"


TASKS: tuple[Task, ...] = (
    Task("reverse", "reverse", LETTERS, lambda s: s[::-1]),
    Task("sort", "sort", DIGITS, lambda s: "".join(sorted(s))),
    Task("upper", "upper", LETTERS, str.upper),
)


def chat(task: Task, payload: str) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "user", "content": task.prompt(payload)},
            {"role": "assistant", "content": task.rule(payload)},
        ]
    }


def make_rows(num_train: int, num_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows, balanced over TASKS, with no prompt in both.

    The held-out prompts are drawn first and then excluded, so the split does not depend on
    num_train: a quick run and a full run are scored on the same held-out examples.
    """
    train: list[dict] = []
    held_out: list[dict] = []
    for i, task in enumerate(TASKS):
        # One generator per task (string seeds hash deterministically), so the held-out part of a
        # task does not shift when another task draws more training rows.
        rng = random.Random(f"{seed}:{task.name}")
        n_eval = num_eval // len(TASKS) + (i < num_eval % len(TASKS))
        n_train = num_train // len(TASKS) + (i < num_train % len(TASKS))
        seen: set[str] = set()
        for out, n in ((held_out, n_eval), (train, n_train)):
            # Payload spaces hold tens of thousands of strings or more, so rejection ends quickly.
            while n > 0:
                payload = task.sample(rng)
                if payload in seen:
                    continue
                seen.add(payload)
                out.append(chat(task, payload))
                n -= 1
    # Interleave tasks so every training batch sees all of them.
    random.Random(f"{seed}:shuffle").shuffle(train)
    return train, held_out


def make_datasets(
    num_train: int, num_eval: int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The rows of `make_rows` as `datasets.Dataset`s with one `messages` column."""
    train, held_out = make_rows(num_train, num_eval, seed)
    return datasets.Dataset.from_list(train), datasets.Dataset.from_list(held_out)
