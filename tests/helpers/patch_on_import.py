"""The import hook both test-only ``sitecustomize`` modules use (tests/helpers/faults, tests/helpers/fakegpu):
a module named in ``patches`` is loaded as usual, then handed to its patch function before anyone else sees
it. Production code carries no hook; a child process gets the patches because the test puts the
sitecustomize's directory on its path."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]):
        self.patches = patches

    def find_spec(self, name, path, target=None):
        if name not in self.patches:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            self.patches[name](module)

        spec.loader.exec_module = exec_module
        return spec


def install(patches: dict[str, Callable[[ModuleType], None]]) -> None:
    """Patch each module of ``patches`` as it is imported, in this process."""
    sys.meta_path.insert(0, _PatchOnImport(patches))
