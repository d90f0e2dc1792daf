"""Compose a RunConfig from `configs/` and command-line overrides with Hydra.

Hydra owns composition (config groups `method/`, `scenario/`, `backbone/`, overrides such as
`trainer.epochs=2`); the result is turned into the plain `RunConfig` dataclass straight away.
Hydra's own errors are rewritten into one message naming the bad override and the valid
choices.
"""
from __future__ import annotations

import os
import re
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
        raise ConfigError([_explain(str(e))]) from None
    finally:
        GlobalHydra.instance().clear()
    data = OmegaConf.to_container(raw, resolve=True)
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:
        raise ConfigError([_explain(str(e))]) from None
    cfg = RunConfig.from_dict(OmegaConf.to_container(merged, resolve=True))
    return validate(cfg)


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
    m = re.search(r"Key '([^']+)' is not in struct", msg) or re.search(r"Could not override '([^']+)'", msg)
    first = msg.strip().splitlines()[0]
    if m:
        key = m.group(1)
        return (f"override {key!r} does not exist ({first}); see `cldist run --help` for the "
                f"config keys")
    return first


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
