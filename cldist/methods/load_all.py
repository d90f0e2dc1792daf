"""Importing this module registers every built-in method."""
from . import baselines, pearl  # noqa: F401
