"""The paper scenario configs (configs/scenario/*.yaml): fields, sources, task counts and
image pipelines, and that they compose."""
from __future__ import annotations

from pathlib import Path

import yaml

from tests.unit.data.conftest import SEED

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "scenario"

PAPER_SCENARIOS = {
    "imagenet_r_5t": ("imagenet_r", 5), "imagenet_r_10t": ("imagenet_r", 10),
    "imagenet_r_20t": ("imagenet_r", 20), "imagenet_a_10t": ("imagenet_a", 10),
    "domainnet_5t": ("domainnet", 5), "domainnet_domains": ("domainnet", 6),
    "cifar100_10t": ("cifar100", 10), "cub200_10t": ("cub200", 10),
}
PUBLISHED_CLASSES = {"imagenet_r": 200, "imagenet_a": 200, "domainnet": 345, "cifar100": 100,
                     "cub200": 200}


def test_paper_scenario_configs():
    from dataclasses import fields

    from cldist.config.schema import ScenarioConfig
    from cldist.data.sources import SOURCES

    keys = {f.name for f in fields(ScenarioConfig)}
    for name, (source, n_tasks) in PAPER_SCENARIOS.items():
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert set(config) <= keys, name
        assert config["name"] == name and config["source"] == source in SOURCES
        assert config["n_tasks"] == n_tasks and config["class_order_seed"] == SEED
        assert (config["image_size"], config["train_crop"], config["test_resize"]) == \
            (224, "random_resized", 256)
        assert config["normalize"] in ("none", "backbone")
        if name != "domainnet_domains":
            assert PUBLISHED_CLASSES[source] % n_tasks == 0
    assert yaml.safe_load((CONFIGS / "domainnet_domains.yaml").read_text())["manifest"]
    fmnist = yaml.safe_load((CONFIGS / "fmnist_5t.yaml").read_text())
    combined = yaml.safe_load((CONFIGS / "fmnist_digits_10t.yaml").read_text())
    assert combined["source"] == "fmnist_digits" and combined["n_tasks"] == 10
    for key in ("max_test_per_class", "image_size", "augment", "normalize", "class_order_seed"):
        assert combined[key] == fmnist[key]
    # 150 train images per class: about what the digits have, so the 20 classes stay balanced
    assert combined["max_train_per_class"] == 150


def test_paper_scenario_composes():
    from cldist.config.compose import compose

    cfg = compose(["scenario=imagenet_r_10t", "scenario.normalize=backbone"])
    assert (cfg.scenario.train_crop, cfg.scenario.test_resize) == ("random_resized", 256)
    assert cfg.scenario.data_dir.endswith("imagenet_r_10t")
