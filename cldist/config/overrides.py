"""`key=value` overrides applied to a run's stored config dict on resume (`cldist resume RUN`
and `cldist resume SWEEP`): which keys may change, and setting them in place."""
from __future__ import annotations

from ..errors import UserError

# Where and how the rest of a run executes may change on resume; what it computes may not.
RESUME_OVERRIDABLE = ("cluster.", "trainer.max_concurrent_tasks", "trainer.max_failures",
                      "trainer.poll_interval_s", "trainer.gpus_per_worker", "runner", "report")
# ...and, with --allow-lr-change, the learning rates: lowering one is the fix a NaN loss asks
# for, and restarting a long stream for it would throw away every finished task. It changes
# what the run computes, hence the explicit flag; the new value is written into the run's
# config, and state.json records which tasks had finished before it.
RESUME_LR_KEYS = ("method.lr", "method.stage1_lr")
LR_FLAG = "--allow-lr-change"


def resume_may_change(key: str, allow_lr: bool) -> bool:
    keys = RESUME_OVERRIDABLE + (RESUME_LR_KEYS if allow_lr else ())
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def refuse_resume_overrides(overrides: list[str], allow_lr: bool) -> None:
    bad = [o for o in overrides if not resume_may_change(o.split("=", 1)[0], allow_lr)]
    if bad:
        raise UserError(f"resume keeps the run's own config; {bad} would change it. Only "
                        f"{', '.join(RESUME_OVERRIDABLE)} may be overridden on resume (and "
                        f"{', '.join(RESUME_LR_KEYS)} with {LR_FLAG}) - start a new run for "
                        f"other changes")


def apply_overrides(data: dict, overrides: list[str], allow_lr: bool) -> dict[str, object]:
    """Set each KEY=VALUE in `data` (in place); returns the learning rates set, old values."""
    from .compose import did_you_mean
    refuse_resume_overrides(overrides, allow_lr)
    persisted = {}
    for o in overrides:
        key, sep, value = o.partition("=")
        if not sep:
            raise UserError(f"override {o!r} is not KEY=VALUE")
        node = data
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise UserError(f"override {key!r} does not exist{did_you_mean(key)}")
        if key in RESUME_LR_KEYS:
            persisted[key] = node[leaf]  # the old value
        node[leaf] = parse_value(value)
    return persisted


def parse_value(text: str):
    import yaml
    return yaml.safe_load(text) if text != "" else ""
