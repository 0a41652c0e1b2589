"""The codebase's shape, checked: imports point only down the layers, light imports stay light,
and the transformers internals chatsft relies on are still what it was written against."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, offline_env


def modules_after(code: str) -> set[str]:
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=offline_env()
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.slow
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


# Import layers, lowest first: a module may import from its own layer and the layers below it,
# never from one above. A module that fits no layer fails the test, so a new one must be placed.
LAYERS = (
    ("chatsft.errors", "chatsft.files", "chatsft.log", "chatsft._lazy"),  # no chatsft imports
    ("chatsft.data",),  # rows → tokens → masks → packed batches
    ("chatsft.model",),  # loading, attention kernels, the loss
    ("chatsft.generation",),  # what runs a model to generate: knobs, generate, chat
    # SFTConfig sits above the components it configures: it checks its values against their
    # tables (PACKING_STRATEGIES, the decoding knobs), and data/, model/ and generation/ can never
    # take an SFTConfig (DESIGN: components take plain arguments).
    ("chatsft.config",),
    ("chatsft.train",),  # SFTTrainer and what a run writes
    ("chatsft.estimate", "chatsft.inspect", "chatsft.export", "chatsft.demo"),
    ("chatsft.cli", "chatsft.__main__", "chatsft"),  # the commands; the package's public API
)
SRC = ROOT / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            # "chatsft" is the package's own __init__, not everything below it.
            if module == prefix or (prefix != "chatsft" and module.startswith(prefix + ".")):
                return index
    return None


def chatsft_imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every chatsft import in the file: module level, in functions, and
    under TYPE_CHECKING alike."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]  # level 1 is the package itself
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import load` imports the module chatsft.x.load
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return [(line, m) for line, m in found if m == "chatsft" or m.startswith("chatsft.")]


def test_imports_point_only_down_the_layers():
    files = sorted((SRC / "chatsft").rglob("*.py"))
    known = {module_name(p) for p in files}
    unplaced = sorted(m for m in known if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS): {unplaced}"
    upward = []
    for path in files:
        name = module_name(path)
        for line, target in chatsft_imports(path, known):
            if layer_of(target) is None or layer_of(target) > layer_of(name):
                upward.append(f"{path.relative_to(ROOT)}:{line} {name} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
