"""A real `mlflow server` on 127.0.0.1 for integration tests.

tests/conftest.py provides the session's shared server as the `mlflow_server` fixture: every test module that asks
for `mlflow_server` without importing it gets that one server (launched in the background as soon as collection finds
a user, so its cold start overlaps the first tests). Modules sharing it keep to their own experiment and model names
and leave it running (a module that stops it to simulate an outage starts it again, and the fixture starts it again
for each module anyway).

A module whose assertions need a registry no other module has written to (e.g. the quickstart's `nvae-digits`
registered exactly once, or not at all) imports a private, module-scoped server instead:

    from mlflow_server import mlflow_server, mlflow_server_early  # noqa: F401  (pytest fixtures)

    def test_x(mlflow_server):
        client = MlflowClient(mlflow_server.uri)
        mlflow_server.stop()    # simulate an outage (the process is killed, the port refuses connections)
        mlflow_server.start()   # same port, same sqlite store and artifact directory

(`mlflow_server_early` is autouse: it launches the module's server in the background when the module's first test
starts, if any selected test of the module uses it, and the first user waits for it to be healthy.)

Artifacts are proxied (``--serve-artifacts`` with ``--artifacts-destination``) so clients upload over HTTP like
they would to the cluster's MLflow service; a stopped server therefore also blocks artifact uploads.

A cold start takes 10-25 s on a loaded 2-core machine (schema migration + importing the FastAPI app twice), a
restart on an existing store roughly half that, so servers are shared as widely as the tests allow: tests share one
server and must leave it running (``start()`` is a no-op when it already is).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Generous: the CI machine has 2 cores and other test processes compete for them.
STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One `mlflow server` process group bound to a fixed port and store; stop()/start() keep both."""

    def __init__(self, root: str | Path, port: int | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def launch(self) -> None:
        """Start the server process without waiting for it; start() waits until it answers."""
        if self.running:
            return
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [
            str(mlflow_cli) if mlflow_cli.exists() else "mlflow",
            "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
            "--serve-artifacts", "--artifacts-destination", str(self.root / "art"),
        ]
        env = dict(os.environ)
        # The huey job runner (LLM-judge scheduling etc.) is a second heavy process we do not need.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_path, "ab")
        # Own process group: `mlflow server` forks uvicorn, and stop() must take both down.
        self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Launch the server unless it runs, and wait until it answers (at once when it already does)."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1.0) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server like a crash would (SIGKILL to its process group): fast and leaves the store as is."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=30)
        self._proc = None
        # The port must refuse connections before stop() returns, or an outage test would race the dying server.
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _module_uses(request, fixture: str) -> bool:
    return any(item.module is request.module and fixture in item.fixturenames for item in request.session.items)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server_early(request, tmp_path_factory):
    """The module's private server, launched (not waited for) when the module's first test starts, so its cold start
    overlaps the tests that come before its first user; None when no selected test of the module uses it."""
    if not _module_uses(request, "mlflow_server"):
        yield None
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mlflow_server(request, tmp_path_factory):
    """A private server for one module (the session's shared one is tests/conftest.py's `mlflow_server`)."""
    early = request.getfixturevalue("mlflow_server_early") if "mlflow_server_early" in request.fixturenames else None
    server = early or MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        if early is None:
            server.stop()
