"""The benchmark sources of `cldist data build`: each source built from a tiny tree in its
published layout (tests/unit/data/conftest.py) and checked for counts, class order, checksums
and a two-rank split; domain-incremental manifests, parallel and resumed builds, the CIFAR
pickle refusal and the build command line."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

import cldist.data.build as build_module
from cldist.cli import main
from cldist.data import Manifest, TaskReader, build_dataset, make_transform
from cldist.errors import DataError
from tests.unit.data.conftest import SEED, WNIDS, _check_dataset, _counts, _keys, _members, _wordnet_tree


# ------------------------------------------------------------------- sources
def test_imagenet_r_seeded_split_and_original_files(imagenet_r, trees):
    manifest = _check_dataset(imagenet_r, n_classes=6, n_tasks=3)
    assert manifest.source == "imagenet_r" and manifest.class_names == WNIDS
    assert manifest.image_size is None and manifest.channels == 3
    assert manifest.format_version == 2  # image_size null needs format 2
    assert _counts(manifest) == [(8, 2)] * 3  # 5 images per class: 4 train, 1 test
    originals = {hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in (trees / "imagenet-r").rglob("*.jpg")}
    kinds = {}
    for shard in (imagenet_r / "train").glob("*.tar"):
        for name, data in _members(shard):
            ext = name.split(".", 1)[1]
            kinds[ext] = kinds.get(ext, 0) + 1
            if ext == "jpg":  # stored byte for byte
                assert hashlib.sha256(data).hexdigest() in originals
    for shard in (imagenet_r / "test").glob("*.tar"):
        for name, _ in _members(shard):
            ext = name.split(".", 1)[1]
            kinds[ext] = kinds.get(ext, 0) + 1
    # 30 samples; the GIF in disguise was re-encoded as PNG.
    assert kinds == {"jpg": 29, "png": 1, "cls": 30}
    # Images of different sizes, streamed through the papers' test pipeline.
    images, labels = TaskReader(manifest, 1, "test", make_transform(16, 3, resize=18)).tensors()
    assert images.shape == (2, 3, 16, 16)
    assert sorted(labels.tolist()) == manifest.task_stream_labels(1)


def test_imagenet_r_split_lists_beside_the_classes(trees, tmp_path):
    root = tmp_path / "imagenet-r"
    paths = _wordnet_tree(root, 4, seed=3)
    (root / "train.txt").write_text("".join(f"{p}\n" for p in paths if not p.endswith("_3.jpg")
                                            and not p.endswith("_0.jpg")))
    (root / "test.txt").write_text("".join(f"{p} 0\n" for p in paths if p.endswith("_3.jpg")))
    manifest = build_dataset("imagenet_r", tmp_path / "out", root=root, n_tasks=2)
    assert _counts(manifest) == [(6, 3), (6, 3)]  # art_0 is in neither list: left out
    assert manifest.build["split_file"] == str(root.resolve())


def test_imagenet_a_split_file_explicit_order_and_task_sizes(trees, tmp_path):
    order = list(reversed(WNIDS))  # class names work as well as ids
    manifest = build_dataset("imagenet_a", tmp_path / "out", root=trees / "a-root",
                             split_file=trees / "a-split.txt", class_order=order,
                             classes_per_task=[2, 4], seed=SEED)
    assert manifest.class_order == [5, 4, 3, 2, 1, 0] and manifest.order_seed is None
    assert manifest.build["order"] == "explicit"
    assert [t.classes for t in manifest.tasks] == [[5, 4], [3, 2, 1, 0]]
    assert manifest.class_offsets() == [0, 2]
    assert _counts(manifest) == [(4, 2), (8, 4)]
    _check_dataset(tmp_path / "out", n_classes=6, n_tasks=2, seeded=False)
    with pytest.raises(DataError, match=r"missing: \[0\]"):
        build_dataset("imagenet_a", tmp_path / "bad", root=trees / "a-root",
                      split_file=trees / "a-split.txt", class_order=[5, 4, 3, 2, 1])


def test_domainnet_class_incremental_pools_domains(trees, tmp_path):
    manifest = build_dataset("domainnet", tmp_path / "out", root=trees / "domainnet",
                             n_tasks=2, seed=SEED)
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2)
    assert manifest.class_names == ["airplane", "bee", "cat", "dog"]
    assert manifest.scenario == "class" and manifest.build["domains"] == [
        "clipart", "real", "sketch"]
    assert _counts(manifest) == [(18, 6), (18, 6)]  # 2 classes x 3 domains x (3 train, 1 test)


def test_domainnet_domain_incremental_manifest(domain_il):
    manifest = _check_dataset(domain_il, n_classes=4, n_tasks=3)
    assert manifest.domain_incremental and manifest.format_version == 2
    assert [t.domain for t in manifest.tasks] == ["real", "clipart", "sketch"]
    assert all(t.classes == manifest.class_order for t in manifest.tasks)
    assert manifest.class_offsets() == [0, 0, 0]  # one shared label space
    assert all(manifest.task_stream_labels(t) == [0, 1, 2, 3] for t in range(3))
    assert _counts(manifest) == [(12, 4)] * 3
    _, labels = TaskReader(manifest, 2, "train", make_transform(8, 3)).tensors()
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # Every sample of a task comes from that task's domain (keys index the pooled split).
    data = build_module.load_source("domainnet", Path(manifest.build["root"]),
                                    domains=manifest.build["domains"])
    for task in manifest.tasks:
        domain = data.domain_names.index(task.domain)
        for key in _keys(manifest, task.task_id, "test"):
            assert data.test.domains[int(key.split("-")[1])] == domain


def test_domainnet_rejects_bad_lists(trees, tmp_path):
    root = Path(shutil.copytree(trees / "domainnet", tmp_path / "dn"))
    with open(root / "real_test.txt", "a") as fh:
        fh.write("real/cat/real_missing.jpg 2\n")
    with pytest.raises(DataError, match="real_missing.jpg.*does not exist"):
        build_dataset("domainnet", tmp_path / "out", root=root, n_tasks=2)
    with pytest.raises(DataError, match="--domains"):
        build_dataset("domainnet", tmp_path / "out2", root=trees / "domainnet",
                      domains=["quickdraw"])
    with pytest.raises(DataError, match="has no domains"):
        build_dataset("digits", tmp_path / "out3", scenario="domain")


def test_cifar100_binary_records_round_trip(trees, tmp_path):
    manifest = build_dataset("cifar100", tmp_path / "out", root=trees, n_tasks=2,
                             order="natural")
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2, seeded=False)
    assert manifest.class_names == ["apple", "aquarium_fish", "baby", "bear"]
    assert manifest.image_size == 32 and manifest.channels == 3
    assert _counts(manifest) == [(6, 4), (6, 4)]
    records = np.frombuffer((trees / "cifar-100-binary" / "test.bin").read_bytes(),
                            np.uint8).reshape(-1, 3074)
    wanted = {records[i, 2:].tobytes() for i in range(len(records)) if records[i, 1] in (0, 1)}
    images, _ = TaskReader(manifest, 0, "test", make_transform(32, 3)).tensors()
    stored = {np.rint(img.numpy() * 255).astype(np.uint8).tobytes() for img in images}
    assert stored == wanted  # planes R, G, B survive exactly


def test_cifar100_pickle_distribution_is_refused_unopened(tmp_path):
    sentinel = tmp_path / "unpickled"

    class Payload:  # unpickling this would create `sentinel`
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    python = tmp_path / "cifar-100-python"
    python.mkdir()
    for name in ("train", "test", "meta"):
        (python / name).write_bytes(pickle.dumps(Payload()))
    for root in (tmp_path, python):
        with pytest.raises(DataError) as info:
            build_dataset("cifar100", tmp_path / "out", root=root, n_tasks=2)
        message = str(info.value)
        assert "never unpickles" in message and "cifar-100-binary.tar.gz" in message
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_cifar100_truncated_binary(trees, tmp_path):
    root = Path(shutil.copytree(trees / "cifar-100-binary", tmp_path / "cifar-100-binary"))
    (root / "test.bin").write_bytes((root / "test.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"test\.bin.*whole number of 3074-byte records"):
        build_dataset("cifar100", tmp_path / "out", root=root, n_tasks=2)


def test_cub200_official_split(trees, tmp_path):
    manifest = build_dataset("cub200", tmp_path / "out", root=trees, n_tasks=2, seed=SEED)
    _check_dataset(tmp_path / "out", n_classes=4, n_tasks=2)
    assert manifest.class_names[0] == "Black_footed_Albatross"
    assert _counts(manifest) == [(4, 2), (4, 2)]
    assert manifest.image_size is None


def test_folder_with_split_file_and_original_files(trees, tmp_path):
    root = trees / "a-root" / "imagenet-a"
    manifest = build_dataset("folder", tmp_path / "out", root=root, n_tasks=3,
                             split_file=trees / "a-split.txt", image_size="original")
    _check_dataset(tmp_path / "out", n_classes=6, n_tasks=3)
    assert _counts(manifest) == [(4, 2)] * 3 and manifest.image_size is None
    with pytest.raises(DataError, match="--image-size"):  # mixed sizes need a choice
        build_dataset("folder", tmp_path / "out2", root=root, n_tasks=3)


def test_fmnist_digits_twenty_classes(trees, tmp_path):
    manifest = build_dataset("fmnist_digits", tmp_path / "out", root=trees / "fashion",
                             n_tasks=10, seed=SEED, max_train_per_class=2, max_test_per_class=1)
    _check_dataset(tmp_path / "out", n_classes=20, n_tasks=10)
    assert manifest.class_names[0] == "fashion:T-shirt/top"
    assert manifest.class_names[10:] == [f"digit:{i}" for i in range(10)]
    assert manifest.image_size == 28 and manifest.channels == 1
    assert _counts(manifest) == [(4, 2)] * 10
    images, _ = TaskReader(manifest, 0, "train", make_transform(28, 1)).tensors()
    assert images.shape == (4, 1, 28, 28)


def test_unknown_source_option_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not take --split-file"):
        build_dataset("cifar100", tmp_path / "o", root=tmp_path, split_file=tmp_path / "x")
    with pytest.raises(DataError, match="needs --root.*imagenet-r.*docs/DATA.md"):
        build_dataset("imagenet_r", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no WordNet-id class folders"):
        build_dataset("imagenet_r", tmp_path / "o", root=tmp_path / "empty")


# --------------------------------------------------- parallel, resumable builds
def test_parallel_build_is_identical(imagenet_r, trees, tmp_path):
    parallel = build_dataset("imagenet_r", tmp_path / "par", root=trees / "imagenet-r",
                             n_tasks=3, seed=SEED, shard_max_samples=3, workers=2)
    assert parallel.to_dict() == Manifest.load(imagenet_r).to_dict()
    digits = dict(n_tasks=5, max_train_per_class=6, max_test_per_class=2, shard_max_samples=4)
    one = build_dataset("digits", tmp_path / "d1", **digits)
    two = build_dataset("digits", tmp_path / "d2", workers=2, **digits)
    assert one.to_dict() == two.to_dict()


def test_interrupted_build_resumes_keeping_verified_shards(tmp_path, monkeypatch):
    spec = dict(n_tasks=2, max_train_per_class=6, max_test_per_class=3, shard_max_samples=4)
    reference = build_dataset("digits", tmp_path / "ref", **spec)

    class Interrupt(Exception):
        pass

    def stop_after_three(done, total, samples, total_samples):
        if done == 3:
            raise Interrupt
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        build_dataset("digits", out, progress=stop_after_three, **spec)
    assert not (out / "manifest.json").exists() and (out / build_module.BUILD_JOURNAL).exists()
    written = [reference.tasks[0].train[i].path for i in range(3)]
    damaged = out / written[1]
    damaged.write_bytes(damaged.read_bytes()[:-600])  # a shard that no longer verifies

    rewritten = []
    original = build_module._write_job

    def counting(data, storage, out_dir, job):
        rewritten.append(job.relpath)
        return original(data, storage, out_dir, job)
    monkeypatch.setattr(build_module, "_write_job", counting)
    resumed = build_dataset("digits", out, **spec)
    assert resumed.to_dict() == reference.to_dict()
    assert written[0] not in rewritten and written[2] not in rewritten
    assert written[1] in rewritten
    n_shards = sum(len(t.train) + len(t.test) for t in reference.tasks)
    assert len(rewritten) == n_shards - 2
    assert not (out / build_module.BUILD_JOURNAL).exists()
    # A finished dataset rebuilt with the same spec keeps every shard.
    rewritten.clear()
    build_dataset("digits", out, **spec)
    assert rewritten == []


def test_progress_lines_for_a_file(tmp_path):
    log = io.StringIO()
    build_dataset("digits", tmp_path / "out", n_tasks=2, max_train_per_class=4,
                  max_test_per_class=2, shard_max_samples=2,
                  progress=build_module.LineProgress(log, every_s=3600))
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 11  # about one per 10%
    # 2 tasks x 5 classes x (4 train + 2 test), 2 samples per shard
    assert lines[-1].startswith("[data] 30/30 shards  60/60 samples (100%)")


def test_cli_build_with_class_order_file_and_workers(trees, tmp_path, capsys):
    order = tmp_path / "order.txt"
    order.write_text("# WordNet ids, first task first\n" + "\n".join(WNIDS[::-1]) + "\n")
    out = tmp_path / "out"
    assert main(["data", "build", "--source", "imagenet_a", "--root", str(trees / "a-root"),
                 "--split-file", str(trees / "a-split.txt"), "--out", str(out),
                 "--class-order", str(order), "--classes-per-task", "3,3",
                 "--workers", "2", "--shard-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 tasks, 12 train / 6 test samples" in captured.out
    assert "[data] 10/10 shards" in captured.err  # per task: 6 train in 3, 3 test in 2
    assert Manifest.load(out).class_order == [5, 4, 3, 2, 1, 0]
    assert main(["data", "verify", str(out), "--no-decode"]) == 0
    code = main(["data", "build", "--source", "domainnet", "--root", str(trees / "domainnet"),
                 "--out", str(tmp_path / "dn"), "--scenario", "domain", "--tasks", "3"])
    assert code == 2 and "one task per domain" in capsys.readouterr().err



# ---------------------------------------------------------------- manifests
def _domain_dict(domain_il) -> dict:
    return json.loads((domain_il / "manifest.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=1), "needs format_version 2"),
    (lambda d: d["tasks"][1].pop("domain"), "tasks[1].domain"),
    (lambda d: d["tasks"][2].update(domain="real"), "also task 0's domain"),
    (lambda d: d["tasks"][0]["classes"].pop(), "must hold every class"),
    (lambda d: d.update(scenario="task"), "scenario: must be one of"),
])
def test_domain_manifest_validation(domain_il, tmp_path, edit, message):
    data = _domain_dict(domain_il)
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        Manifest.load(tmp_path)
    assert message in str(info.value)


def test_class_manifests_stay_format_1(tmp_path):
    manifest = build_dataset("digits", tmp_path / "d", n_tasks=2, max_train_per_class=2,
                             max_test_per_class=1)
    data = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert data["format_version"] == 1 and "scenario" not in data
    assert all("domain" not in t for t in data["tasks"])
    data["tasks"][0]["domain"] = "real"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="only domain-incremental tasks have a domain"):
        Manifest.load(tmp_path)
    assert manifest.class_offsets() == [0, 5]


