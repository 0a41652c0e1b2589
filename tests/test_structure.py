"""The codebase's shape, checked: light imports stay light, and the transformers internals chatsft
relies on are still what it was written against."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from conftest import offline_env


def modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=offline_env()
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_help_and_the_data_package_do_not_load_the_trainer():
    helped = modules_after("from chatsft.cli import main, usage\nusage()")
    assert "torch" not in helped and "transformers" not in helped
    data = modules_after(
        "import chatsft.data.formats, chatsft.data.tokenize, chatsft.data.packing, "
        "chatsft.data.collate, chatsft.data.load, chatsft.data.streaming"
    )
    assert "transformers.trainer" not in data
    knobs = modules_after("import chatsft.generation.knobs")
    assert "torch" not in knobs


@pytest.mark.parametrize(
    "name", sorted(__import__("chatsft.train.trainer").train.trainer.PRIVATE_TRAINER_METHODS)
)
def test_private_trainer_methods_have_the_signature_chatsft_was_written_for(name):
    from transformers import Trainer

    from chatsft.train.trainer import PRIVATE_TRAINER_METHODS

    method = getattr(Trainer, name, None)
    assert method is not None, f"transformers.Trainer.{name} is gone: chatsft's override is dead"
    params = tuple(inspect.signature(method).parameters)
    assert params == PRIVATE_TRAINER_METHODS[name], (
        f"transformers.Trainer.{name}{params} changed: check chatsft.trainer's override"
    )
