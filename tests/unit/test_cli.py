"""The CLI's error contract: one message naming the culprit and the fix, exit status 2,
and no run directory left behind that looks like a run."""
from __future__ import annotations

import shutil

import pytest

from cldist.cli import main

from tests.conftest import tiny_overrides


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("method=nope", ["method=nope", "pearl"]),
    ("backbone=nope", ["backbone=nope", "test_vit"]),
    ("scenario=nope", ["scenario=nope", "digits_5t"]),
    ("trainer.nope=1", ["trainer.nope"]),
    ("runner=spark", ["runner=spark", "inline"]),
    ("trainer.zero_stage=7", ["trainer.zero_stage=7"]),
    ("method.min_rank=0", ["method.min_rank=0"]),
    # a key PEARL does not have (another method's): refused by name, not silently ignored
    ("method.kappa_max=1", ["method.kappa_max", "does not exist"]),
    ("method.rank=4", ["method.rank", "does not exist"]),
])
def test_bad_override(tmp_path, digits_dir, capsys, override, expected):
    run_dir = tmp_path / "run"
    code, err = _run(["run", *tiny_overrides(digits_dir, run_dir), override], capsys)
    assert code == 2
    for text in expected:
        assert text in err
    assert not run_dir.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_inline_gpu_run_without_a_gpu(tmp_path, digits_dir, capsys):
    run_dir = tmp_path / "run"
    code, err = _run(["run", *tiny_overrides(digits_dir, run_dir), "runner=inline",
                      "trainer.use_gpu=true"], capsys)
    assert code == 2 and "trainer.use_gpu=true" in err and "no CUDA device" in err
    assert not run_dir.exists()


@pytest.mark.parametrize("extra, shares", [
    ((), (0.0, 0.0)),  # CPU run: evaluators on the CPU
    (("trainer.use_gpu=true",), (0.9, 0.05)),  # two evaluators beside a worker on one GPU
    (("trainer.use_gpu=true", "cluster.eval_actors=4"), (0.8, 0.05)),
    (("trainer.use_gpu=true", "cluster.eval_gpus=0"), (1.0, 0.0)),
    (("cluster.eval_gpus=0.25",), (0.0, 0.25)),  # CPU training, GPU scoring
])
def test_gpu_shares(tmp_path, digits_dir, extra, shares):
    """Long-lived evaluators and a training worker must fit on one GPU together."""
    from cldist.config.compose import compose
    from cldist.config.schema import gpu_shares
    assert gpu_shares(compose(tiny_overrides(digits_dir, tmp_path, *extra))) == shares


def test_every_problem_reported_at_once(tmp_path, digits_dir, capsys):
    code, err = _run(["run", *tiny_overrides(digits_dir, tmp_path / "r"), "trainer.batch_size=0",
                      "method.epochs=0", "method.lr=-1"], capsys)
    assert code == 2
    assert "trainer.batch_size=0" in err and "method.epochs=0" in err and "method.lr=-1" in err


def test_missing_data_root(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, err = _run(["run", "scenario=fmnist_5t", f"scenario.data_dir={tmp_path / 'fm'}",
                      "scenario.root=/nonexistent/fmnist", f"run_dir={run_dir}"], capsys)
    assert code == 2
    assert "/nonexistent/fmnist" in err and "dataset-fashion-mnist" in err
    assert not run_dir.exists()


def test_data_dir_built_with_other_caps(tmp_path, digits_dir, capsys):
    """A scenario whose caps changed must not silently reuse shards built with the old ones."""
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    run_dir = tmp_path / "run"
    code, err = _run(["run", "scenario=digits_5t", f"scenario.data_dir={data}",
                      "scenario.max_train_per_class=7", f"run_dir={run_dir}"], capsys)
    assert code == 2
    assert "max_train_per_class" in err and "asked 7" in err and str(data) in err
    assert not run_dir.exists()


def test_manifest_not_matching_shards(tmp_path, digits_dir, capsys):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = sorted((data / "train").glob("task-001-*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[600] ^= 0xFF
    shard.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    code, err = _run(["run", *tiny_overrides(data, run_dir)], capsys)
    assert code == 2
    assert shard.name in err and "checksum" in err
    assert not run_dir.exists()


def test_no_lora_target_matched(tmp_path, digits_dir, capsys):
    run_dir = tmp_path / "run"
    code, err = _run(["run", *tiny_overrides(digits_dir, run_dir), "method.targets=[blocks.*.nothing]"],
                     capsys)
    assert code == 2
    assert "blocks.*.nothing" in err and "blocks.0.attn" in err
    assert not run_dir.exists()


def test_data_build_unknown_source(capsys, tmp_path):
    code, err = _run(["data", "build", "--source", "imagenet_zz", "--out", str(tmp_path)], capsys)
    assert code == 2 and "imagenet_zz" in err and "digits" in err


def test_data_build_and_verify(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "build", "--source", "digits", "--out", str(out), "--tasks", "2",
                 "--max-train-per-class", "5", "--max-test-per-class", "2"]) == 0
    assert main(["data", "verify", str(out)]) == 0
    assert "ok" in capsys.readouterr().out
    # a damaged shard: exit 2 and a line naming it (the same status `cldist run` refuses with)
    shard = sorted((out / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])
    assert main(["data", "verify", str(out), "--no-decode"]) == 2
    captured = capsys.readouterr()
    assert shard.name in captured.err and "problem(s)" in captured.out  # checksum, truncation


def test_help_lists_groups(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "method=" in out and "pearl" in out and "trainer.zero_stage" in out
