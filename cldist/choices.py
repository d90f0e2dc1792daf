"""Names a run's config chooses from whose implementations live above config/.

config/ validates `method.optimizer` and `runner` against these, and the packages that build
them read the same names here (config/ may not import train/ or runners/; one list each)."""
from __future__ import annotations

# method.optimizer: each one built by cldist.train.engine.make_optimizer
OPTIMIZERS = ("adamw", "sgd")

# runner name -> "module:class", imported on first use by cldist.runners.runner_class:
# `runner=inline` never imports Ray
RUNNERS: dict[str, str] = {
    "inline": "cldist.runners.inline:InlineRunner",
    "ray": "cldist.distributed.runner:RayRunner",
}
