"""Run configuration: schema, validation, Hydra composition."""
from .schema import RunConfig, validate  # noqa: F401
