"""Shared test setup: deterministic, single-threaded torch (2-core CI machines), and DeepSpeed's CPU op built early."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Where every launched job keeps DeepSpeed's compiled ops (core/training/cli.py, tests/launch.py): one build serves
# the jobs, the tests' own DeepSpeed workers and the early build below.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vaebm" / "torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

# DeepSpeed JIT-builds its CPU shared-memory communication op (about 45 s of one core) the first time a process starts
# a process group, and caches it. On a fresh machine that build would land inside whichever test starts DeepSpeed
# first; the session starts it in the background instead, on the core the first single-process tests leave idle (a
# test that gets there first waits on the build's file lock, as two ranks do).
_BUILD_OP = ("from deepspeed.accelerator import get_accelerator; "
             "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
_build: subprocess.Popen | None = None


def _op_is_built() -> bool:
    return any(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/deepspeed_shm_comm*.so"))


def pytest_sessionstart(session):
    global _build
    if not torch.cuda.is_available() and not _op_is_built():
        _build = subprocess.Popen([sys.executable, "-c", _BUILD_OP], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)


def pytest_sessionfinish(session):
    if _build is not None and _build.poll() is None:  # a short run ended first: the next build starts over
        _build.kill()
        _build.wait()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
