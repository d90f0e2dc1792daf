"""Shared fixtures: tiny data built once per session, one Ray cluster per session."""
from __future__ import annotations

import functools
import io
import os
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """Split digits (sklearn's bundled 8x8 digits): 5 tasks of 2 classes, seconds to build."""
    from cldist.data.build import build_dataset
    out = tmp_path_factory.mktemp("digits_5t")
    build_dataset("digits", out, n_tasks=5, seed=1993, max_train_per_class=60, max_test_per_class=30)
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """The embedded local Ray cluster, started once for the whole test session. It declares
    one logical GPU so that GPU shares can be reserved; nothing here runs CUDA."""
    from cldist.distributed.cluster import connect, shutdown
    info = connect(num_cpus=2, num_gpus=1)
    yield info
    shutdown()


def first_tasks(data_dir: Path, out: Path, n_tasks: int) -> Path:
    """A copy of the shards at `data_dir` whose manifest keeps its first `n_tasks` tasks."""
    import json
    import shutil
    shutil.copytree(data_dir, out, dirs_exist_ok=True)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tasks"] = manifest["tasks"][:n_tasks]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def tiny_overrides(data_dir, run_dir, *extra):
    """A seconds-long PEARL stream on the digits shards with timm's test ViT (another method
    with `method=NAME` in `extra`; PEARL's own keys only go to PEARL, since a method refuses
    keys it does not have)."""
    method = next((e.split("=", 1)[1] for e in extra if e.startswith("method=")), "pearl")
    pearl = ["method.stage1_epochs=1", "method.reference_epochs=3"] if method == "pearl" else []
    return ["scenario=digits_5t", f"scenario.manifest={data_dir}", "backbone=test_vit",
            f"run_dir={run_dir}", "method.epochs=2", *pearl, "trainer.batch_size=32",
            "report=false", *extra]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, bytes) members as given - for tests that forge damaged shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def serve_directory(directory: Path, redirect_to: str | None = None):
    """Serve `directory` over http on 127.0.0.1 (or answer every request with a redirect to
    `redirect_to` + the path) from a daemon thread; returns (server, base URL)."""
    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if redirect_to is None:
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", redirect_to + self.path)
            self.end_headers()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
