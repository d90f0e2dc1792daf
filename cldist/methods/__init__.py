"""Continual-learning methods: one file per method, registered by name.

Importing this package imports every module in it, so each method's `@register_method`
fills the registry (and its options class the config's): a new method is a new file here,
nothing to list. The registry is full once `cldist.methods` is imported, whichever of its
modules is imported first.
"""
import importlib
import pkgutil

from .base import METHODS, ContinualMethod, get_method_class, register_method  # noqa: F401

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "ContinualMethod", "get_method_class", "register_method"]
