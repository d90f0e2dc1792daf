"""Compose a RunConfig from `configs/` and command-line overrides with Hydra.

Hydra owns composition (config groups `method/`, `scenario/`, `backbone/`, overrides such as
`trainer.epochs=2`); the result is turned into the plain `RunConfig` dataclass straight away.
Hydra's own errors are rewritten into one message naming the bad override and the valid
choices.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ConfigError
from .schema import RunConfig, validate

GROUPS = ("method", "scenario", "backbone")


def config_dir() -> Path:
    """`configs/` of the checkout (editable install), or $CLDIST_CONFIG_DIR."""
    env = os.environ.get("CLDIST_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError([f"no configs/config.yaml at {path}; set CLDIST_CONFIG_DIR to the "
                           f"repository's configs/ directory"])
    return path


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def compose(overrides: list[str]) -> RunConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    problems = _check_groups(overrides)
    if problems:
        raise ConfigError(problems)
    ConfigStore.instance().store(name="cldist_schema", node=RunConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            raw = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        # Hydra wraps the useful OmegaConf error ("Error merging override X"): read both
        cause = f"{e.__cause__}\n" if e.__cause__ is not None else ""
        raise ConfigError([_explain(cause + str(e))]) from None
    finally:
        GlobalHydra.instance().clear()
    data = OmegaConf.to_container(raw, resolve=True)
    return config_from_dict(data)


def config_from_dict(data, origin: str | None = None) -> RunConfig:
    """A validated RunConfig from plain data (Hydra's output, or a run's config.json).

    The data is merged into the typed schema first, so an unknown key or a value of the wrong
    type is a ConfigError naming the key (and `origin`, the file it came from) rather than a
    TypeError deep inside; keys the data lacks take their defaults (a run written by an older
    cldist). Then `validate` checks the values.
    """
    from omegaconf.errors import OmegaConfBaseException
    where = f"{origin}: " if origin else ""
    if not isinstance(data, dict):
        raise ConfigError([f"{where}must be a JSON object of config sections"])
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    except OmegaConfBaseException as e:
        raise ConfigError([where + _explain(str(e))]) from None
    return validate(RunConfig.from_dict(OmegaConf.to_container(merged, resolve=True)))


def config_keys() -> list[str]:
    """Every dotted key of the run config (`trainer.epochs`, `seed`, ...)."""
    def walk(obj, prefix: str):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
    return list(walk(RunConfig(), ""))


def did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, config_keys(), n=2, cutoff=0.8)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def _check_groups(overrides: list[str]) -> list[str]:
    problems = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            problems.append(f"override {o!r} is not KEY=VALUE")
            continue
        key = key.lstrip("+~")
        if key in GROUPS:
            choices = group_choices(key)
            if value not in choices:
                problems.append(f"{key}={value}: unknown {key}; choose one of {', '.join(choices)}")
    return problems


def _explain(msg: str) -> str:
    """One line from an OmegaConf/Hydra error: the key it is about, and what is wrong."""
    first = msg.strip().splitlines()[0]
    full = re.search(r"full_key: (\S+)", msg)
    unknown = re.search(r"Key '([^']+)' (?:is )?not in", msg) or \
        re.search(r"Could not override '([^']+)'", msg)
    if unknown:
        key = full.group(1) if full else unknown.group(1)
        return (f"key {key!r} does not exist{did_you_mean(key)}; see `cldist run --help` "
                f"for the config keys")
    if full:
        return f"{full.group(1)}: {first}"
    return first


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
