"""What the Ray integration tests share: the tiny preset, a toy-world cache, one Ray per module.

`ray_instance` starts a local Ray (2 CPUs, token authentication off: tests only, the product
keeps it on) once per test module — `ray.init` costs 3-4 s — and yields its GCS address, so a
test can hand it to subprocesses (RAY_ADDRESS). `cache` is one toy-world cache directory for
the session: the tiny world is built by the first test that needs it (under the build's lock)
and loaded by the others; modules that need their own define their own `cache` fixture, which
takes precedence.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    old = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only; the product keeps token auth
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    for k, v in old.items():  # a RAY_ADDRESS left behind would point the next module at a dead Ray
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")
