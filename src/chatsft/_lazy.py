"""Package attributes imported on first use (PEP 562), so importing one light submodule (the
errors, the decoding knobs) does not import torch and transformers through the package."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, module_of: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose public `name` lives in the module
    `module_of[name]` (relative to the package, e.g. ".generation.chat")."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(module_of))

    # A public function named like a submodule (chatsft.estimate, chatsft.generation.generate):
    # importing the submodule binds it on the package, which would hide the function from
    # `from package import name`. The function wins, as it did when these imports were eager; the
    # submodule stays importable by its full name.
    shadowed = {name for name in module_of if importlib.util.find_spec(f"{package}.{name}")}
    if shadowed:

        class Package(types.ModuleType):
            def __setattr__(self, name: str, value: Any) -> None:
                if name in shadowed and isinstance(value, types.ModuleType):
                    return
                super().__setattr__(name, value)

        sys.modules[package].__class__ = Package
    return __getattr__, __dir__
