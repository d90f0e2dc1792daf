"""Continual-learning methods: one file per method, registered by name."""
from .base import METHODS, ContinualMethod, get_method_class, register_method  # noqa: F401

__all__ = ["METHODS", "ContinualMethod", "get_method_class", "register_method"]
