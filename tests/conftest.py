"""Shared test setup: deterministic, single-threaded torch (2-core CI machines), and DeepSpeed's CPU op built early."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# DeepSpeed JIT-builds its CPU shared-memory communication op (about 45 s of one core) the first time a process starts
# a process group, and caches it. On a fresh machine that build would land inside whichever test starts DeepSpeed
# first; the session starts it in the background instead, on the core the first single-process tests leave idle (a
# test that gets there first waits on the build's file lock, as two ranks do).
_BUILD_OP = ("from deepspeed.accelerator import get_accelerator; "
             "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")


def _op_is_built() -> bool:
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("*/deepspeed_shm_comm/*.so")) or any(root.glob("deepspeed_shm_comm/*.so"))


def pytest_sessionstart(session):
    if not torch.cuda.is_available() and not _op_is_built():
        session.config._deepspeed_op_build = subprocess.Popen(
            [sys.executable, "-c", _BUILD_OP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    build = getattr(session.config, "_deepspeed_op_build", None)
    if build is not None and build.poll() is None:
        build.wait(timeout=600)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
