"""Importing this module registers every built-in method."""
from . import baselines, codyra, inflora, pearl, sdlora, slda  # noqa: F401
