"""Streaming shards from elsewhere (cldist.data.remote): http from allowed hosts, the same
samples as a local read across ranks, bad and missing shards named, the shard cache, fsspec."""
from __future__ import annotations

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from cldist.data import Manifest, TaskReader, make_transform, verify_dataset
from cldist.errors import DataError
from tests.unit.data.conftest import _keys


# ------------------------------------------------------------------ streaming
LOOPBACK = ["127.0.0.1"]  # scenario.allowed_hosts for the test server


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        super().do_GET()


@pytest.fixture
def serve(tmp_path):
    """serve(directory) -> base URL of an http server on 127.0.0.1 for that directory."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_Handler, directory=str(directory))
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_http_streaming_matches_local_across_ranks(imagenet_r, serve, tmp_path):
    local = Manifest.load(imagenet_r)
    url = serve(imagenet_r)
    remote = Manifest.load(url, allowed_hosts=LOOPBACK)  # the manifest itself comes over http
    assert remote.to_dict() == local.to_dict()
    assert remote.shard_url(remote.tasks[0].train[0]).startswith(url + "/train/")
    for task in range(remote.n_tasks):
        for split in ("train", "test"):
            kw = dict(shuffle=True, seed=11, epoch=0, shuffle_buffer=3)
            rank0 = _keys(remote, task, split, rank=0, world_size=2, **kw)
            rank1 = _keys(remote, task, split, rank=1, world_size=2, **kw)
            assert rank0 == _keys(local, task, split, rank=0, world_size=2, **kw)
            assert not set(rank0) & set(rank1)
            assert sorted(rank0 + rank1) == sorted(_keys(local, task, split))
    assert verify_dataset(url, allowed_hosts=LOOPBACK) == []
    # With a cache directory every shard is fetched once, then read locally.
    cache = tmp_path / "cache"
    _Handler.requests.clear()
    first, _ = TaskReader(remote, 1, "train", make_transform(8, 3), cache_dir=cache).tensors()
    fetched = len(_Handler.requests)
    assert fetched == len(remote.tasks[1].train)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{s.sha256}.tar" for s in remote.tasks[1].train)
    second, _ = TaskReader(remote, 1, "train", make_transform(8, 3), cache_dir=cache).tensors()
    assert len(_Handler.requests) == fetched and torch.equal(first, second)


def test_http_bad_and_missing_shards_named(imagenet_r, serve, tmp_path):
    directory = Path(shutil.copytree(imagenet_r, tmp_path / "ds"))
    manifest = Manifest.load(directory)
    bad, gone = manifest.tasks[0].train[0], manifest.tasks[1].test[0]
    raw = bytearray((directory / bad.path).read_bytes())
    raw[600] ^= 0xFF
    (directory / bad.path).write_bytes(bytes(raw))
    (directory / gone.path).unlink()
    url = serve(directory)
    remote = Manifest.load(url, allowed_hosts=LOOPBACK)
    for cache in (None, tmp_path / "cache"):
        with pytest.raises(DataError, match="fails its checksum") as info:
            TaskReader(remote, 0, "train", make_transform(8, 3), cache_dir=cache).tensors()
        assert f"{url}/{bad.path}" in str(info.value)
    assert not list((tmp_path / "cache").glob("*.tar"))  # a bad shard is never cached
    with pytest.raises(DataError, match="is missing") as info:
        TaskReader(remote, 1, "test", make_transform(8, 3)).tensors()
    assert gone.path in str(info.value)
    problems = verify_dataset(url, allowed_hosts=LOOPBACK)
    assert any(p.startswith(bad.path) and "sha256 mismatch" in p for p in problems)
    assert any(p.startswith(gone.path) and "missing" in p for p in problems)


def test_shard_cache_env_is_filled_by_the_preflight_check(imagenet_r, serve, tmp_path,
                                                          monkeypatch):
    from cldist.data.remote import verify_shard_checksum
    from cldist.data.remote import SHARD_CACHE_ENV

    cache = tmp_path / "env-cache"
    monkeypatch.setenv(SHARD_CACHE_ENV, str(cache))
    remote = Manifest.load(serve(imagenet_r), allowed_hosts=LOOPBACK)
    for shard in remote.tasks[2].test:  # what `cldist run`'s pre-flight does
        verify_shard_checksum(remote.shard_url(shard), shard.sha256)
        assert (cache / f"{shard.sha256}.tar").is_file()
    _Handler.requests.clear()
    assert len(_keys(remote, 2, "test")) == remote.tasks[2].n_test
    assert _Handler.requests == []  # read from the cache


def test_fsspec_memory_urls(domain_il):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    manifest = Manifest.load(domain_il)
    for task in manifest.tasks:
        for shard in task.train + task.test:
            fs.pipe(f"/cldist-test/{shard.path}", (domain_il / shard.path).read_bytes())
    remote = Manifest.load(domain_il, root="memory://cldist-test",
                           allowed_hosts=["memory://cldist-test"])
    for task in range(remote.n_tasks):
        assert _keys(remote, task, "train", rank=1, world_size=2) == \
            _keys(manifest, task, "train", rank=1, world_size=2)
    fs.rm("/cldist-test", recursive=True)

