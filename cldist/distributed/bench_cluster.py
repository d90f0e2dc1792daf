"""Ray for a benchmark that runs in the middle of other work (`cldist bench step`, `gpu`).

A benchmark that starts the embedded cluster must stop it afterwards, so that what runs next in
the same process (the next benchmark) does not share the CPUs with idle Ray processes; one that
found Ray already connected (a test session's cluster, a user's) must leave it up.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def transient_cluster() -> Iterator[None]:
    """Ray as it is inside the block; stopped afterwards only if it was not up before."""
    import ray

    from .cluster import shutdown

    was_up = ray.is_initialized()
    try:
        yield
    finally:
        if not was_up:
            shutdown()
