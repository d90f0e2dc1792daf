"""Compose a RunConfig from `configs/` and command-line overrides with Hydra.

Hydra owns composition (config groups `method/`, `scenario/`, `backbone/`, overrides such as
`trainer.epochs=2`); the result is turned into the plain `RunConfig` dataclass straight away.
Hydra's own errors are rewritten into one message naming the bad override and the valid
choices.

The method section is typed by the chosen method's own options class: every registered one
(`schema.METHOD_OPTIONS`, filled by `@register_method`) is stored in Hydra's ConfigStore as
`method_schema/<name>`, and configs/config.yaml puts `method_schema/${method}` under `method`
before the method's YAML, so a key the method does not have is refused by name. Nothing here
imports a method: the caller (the CLI, the driver) has imported `cldist.methods`.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ConfigError
from .schema import FORMAT1_METHOD_KEYS, METHOD_OPTIONS, RunConfig, method_options_class, validate

# the ConfigStore group of the method options classes (configs/config.yaml's defaults list)
METHOD_SCHEMA_GROUP = "method_schema"

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
    store = ConfigStore.instance()
    store.store(name="cldist_schema", node=RunConfig)
    for name, options in METHOD_OPTIONS.items():
        store.store(group=METHOD_SCHEMA_GROUP, name=name, node=options)
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


def config_from_dict(data, origin: str | None = None, format1: bool = True) -> RunConfig:
    """A validated RunConfig from plain data (Hydra's output, or a run's config.json).

    The data is merged into the typed schema first, so an unknown key or a value of the wrong
    type is a ConfigError naming the key (and `origin`, the file it came from) rather than a
    TypeError deep inside; keys the data lacks take their defaults (a run written by an older
    cldist). The method section is typed by its method's options class, key by key, and its
    problems are reported together with every bad value `validate` finds. `format1`: carry the
    keys of run-directory format 1 that the method lacks, as every run's config.json holds them
    (FORMAT1_METHOD_KEYS); False refuses them, as `cldist run` does.
    """
    from omegaconf.errors import OmegaConfBaseException
    where = f"{origin}: " if origin else ""
    if not isinstance(data, dict):
        raise ConfigError([f"{where}must be a JSON object of config sections"])
    rest = {k: v for k, v in data.items() if k != "method"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), rest)
    except OmegaConfBaseException as e:
        raise ConfigError([where + _explain(str(e))]) from None
    plain = OmegaConf.to_container(merged, resolve=True)
    method, problems = _method_section(data.get("method", {}), format1)
    plain["method"] = method
    cfg = RunConfig.from_dict(plain)
    try:
        validate(cfg)
    except ConfigError as e:
        problems += e.problems
    if problems:
        raise ConfigError([where + p for p in problems])
    return cfg


def _method_section(data, format1: bool = True) -> tuple[dict, list[str]]:
    """The method section typed by its method's options class (defaults for missing keys), and
    a problem for each key it does not have (format-1 keys excepted: FORMAT1_METHOD_KEYS) or
    holds a value of the wrong type."""
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(data, dict):
        return {"name": "pearl"}, [f"method must be a section of keys, not {data!r}"]
    name = data.get("name", "pearl")
    try:
        cls = method_options_class(name)
    except KeyError as e:
        return {"name": name}, [f"method={name}: {e.args[0]}"]
    own = {f.name for f in fields(cls)}
    # under a `method` key, so that OmegaConf's errors name `method.<key>`
    root, problems, carried = OmegaConf.create({"method": OmegaConf.structured(cls)}), [], {}
    for key, value in data.items():
        if key not in own:
            if format1 and key in FORMAT1_METHOD_KEYS:  # a key every run's config.json holds
                carried[key] = value
            else:
                problems.append(f"key 'method.{key}' does not exist for method {name}"
                                f"{did_you_mean(f'method.{key}', name)}")
            continue
        try:
            root = OmegaConf.merge(root, {"method": {key: value}})
        except OmegaConfBaseException as e:
            problems.append(_explain(str(e)))
    return {**OmegaConf.to_container(root.method, resolve=True), **carried}, problems


def config_keys(method: str | None = None) -> list[str]:
    """Every dotted key of the run config (`trainer.epochs`, `seed`, ...); the method keys of
    `method`, or of every registered method."""
    def walk(obj, prefix: str):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"
    keys = list(walk(RunConfig(), ""))
    for name, options in METHOD_OPTIONS.items():
        if method in (None, name):
            keys += [f"method.{f.name}" for f in fields(options)]
    return list(dict.fromkeys(keys))


def did_you_mean(key: str, method: str | None = None) -> str:
    close = difflib.get_close_matches(key, config_keys(method), n=2, cutoff=0.8)
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
            elif key == "method" and value not in METHOD_OPTIONS:
                problems.append(f"method={value}: configs/method/{value}.yaml exists but no "
                                f"registered method is named {value!r} (registered: "
                                f"{', '.join(sorted(METHOD_OPTIONS))})")
    return problems


def _explain(msg: str) -> str:
    """One line from an OmegaConf/Hydra error: the key it is about, and what is wrong."""
    first = msg.strip().splitlines()[0]
    full = re.search(r"full_key: (\S+)", msg)
    unknown = re.search(r"Key '([^']+)' (?:is )?not in", msg) or \
        re.search(r"Could not override '([^']+)'", msg)
    if unknown:
        key = full.group(1) if full else unknown.group(1)
        # a method section is typed by its method's options class: name that method
        owner = re.search(r"object_type=(\w+)", msg)
        method = next((name for name, cls in METHOD_OPTIONS.items()
                       if owner and key.startswith("method.") and cls.__name__ == owner.group(1)),
                      None)
        if method is not None:
            return (f"key {key!r} does not exist for method {method}"
                    f"{did_you_mean(key, method)}; see configs/method/{method}.yaml for its keys")
        return (f"key {key!r} does not exist{did_you_mean(key)}; see `cldist run --help` "
                f"for the config keys")
    if full:
        return f"{full.group(1)}: {first}"
    return first


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.to_dict()))
