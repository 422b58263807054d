"""Shared test setup: deterministic, single-threaded torch (2-core CI machines), DeepSpeed's CPU op built early, and
the session's one real `mlflow server` (tests/mlflow_server.py), launched early."""
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

import mlflow_server as _private_server  # noqa: E402
from mlflow_server import MlflowServer  # noqa: E402

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
    if _shared_server is not None:
        _shared_server.stop()


# One `mlflow server` for every module that asks for `mlflow_server` without importing tests/mlflow_server.py's
# private one (those modules need a registry nobody else wrote to). A cold start costs 10-25 s of one core; the server
# is launched as soon as collection has found a user, so that start overlaps the tests before the first one.
_shared_server: MlflowServer | None = None


def _uses_shared_server(item) -> bool:
    # A module that imported the private fixture has it as its own `mlflow_server` (and pytest gives it that one).
    private = getattr(getattr(item, "module", None), "mlflow_server", None) is _private_server.mlflow_server
    return "mlflow_server" in item.fixturenames and not private


def pytest_collection_finish(session):
    global _shared_server
    if session.config.option.collectonly or not any(_uses_shared_server(item) for item in session.items):
        return
    _shared_server = MlflowServer(session.config._tmp_path_factory.mktemp("mlflow_server_shared"))
    _shared_server.launch()


@pytest.fixture(scope="session")
def _mlflow_server_shared(tmp_path_factory):
    global _shared_server
    if _shared_server is None:  # collection did not launch it (e.g. a user chosen by a fixture at run time)
        _shared_server = MlflowServer(tmp_path_factory.mktemp("mlflow_server_shared"))
    return _shared_server


@pytest.fixture(scope="module")
def mlflow_server(_mlflow_server_shared):
    """The session's shared server, running: a module before may have stopped it to simulate an outage. Modules using
    it keep to their own experiment and model names and must not assume an empty store."""
    _mlflow_server_shared.start()
    return _mlflow_server_shared


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
