"""Alias so the seed README's ``from backend.cli import parse_args`` works from a checkout.

The code lives in ``modelscape.backend``; ``backend.X`` is the very same module object as
``modelscape.backend.X`` (not a second copy), so classes, pickling and module state agree.
"""
import importlib
import importlib.abc
import importlib.util
import sys


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("modelscape." + spec.name)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())
