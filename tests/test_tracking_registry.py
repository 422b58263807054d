"""load_registered_model against a real `mlflow server`: MLflow's own `models:/` resolution (aliases including the
reserved `latest`, versions, `/latest`) and the two errors a job acts on, model missing vs server unreachable."""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from core.tracking import (ModelNotFoundError, Tracker, TrackingConfig, TrackingUnavailableError,
                           load_registered_model, write_model_dir)

pytestmark = pytest.mark.integration

NAME = "nvae-registry"
HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(4, 3, generator=g), "count": torch.tensor([seed, 2], dtype=torch.int64)}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed: connections are refused


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """Versions 1 and 2 of NAME, logged through Tracker; alias 'champion' points at version 1."""
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="registry", request_timeout_s=3.0,
                         retry_interval_s=0.3)
    with Tracker(cfg, tmp_path_factory.mktemp("registry_run"), is_rank0=True) as tr:
        tr.start("registry", "stage1")
        tr.log_model(NAME, {"version": 1}, _state_dict(1), alias="champion")
        tr.log_model(NAME, {"version": 2}, _state_dict(2))  # default alias 'latest': reserved, nothing to set
        tr.end()
        assert tr.flush(60), tr.stats
        assert tr.stats["dropped"] == 0
    client = MlflowClient(mlflow_server.uri)
    client.create_registered_model("nvae-no-versions")
    return client


@pytest.fixture
def no_global_uri(monkeypatch, tmp_path):
    """Only the explicit tracking_uri leads to the server: a lookup through MLflow's process-wide default would land
    in an empty store here and report every model missing."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("ref, version", [
    ("@latest", 2), ("/latest", 2), ("/2", 2), ("/1", 1), ("@champion", 1),
])
def test_models_uris_resolve_to_the_right_version(mlflow_server, registered, no_global_uri, ref, version):
    config, state = load_registered_model(f"models:/{NAME}{ref}", tracking_uri=mlflow_server.uri)
    assert config == {"version": version}
    _assert_same(state, _state_dict(version))


def test_runs_uri_of_a_registered_version(mlflow_server, registered, no_global_uri):
    mv = registered.get_model_version(NAME, "1")
    assert mv.source.startswith(f"runs:/{mv.run_id}/")
    config, state = load_registered_model(mv.source, tracking_uri=mlflow_server.uri)
    assert config == {"version": 1}
    _assert_same(state, _state_dict(1))


@pytest.mark.parametrize("uri", [
    "models:/nope@latest", "models:/nope/latest", "models:/nope/1", "models:/nope@champion",
    f"models:/{NAME}/99", f"models:/{NAME}@nope", "models:/nvae-no-versions/latest", "models:/nvae-no-versions@latest",
    "runs:/0123456789abcdef0123456789abcdef/model",
])
def test_missing_model_version_alias_or_run(mlflow_server, registered, no_global_uri, uri):
    with pytest.raises(ModelNotFoundError, match=re.escape(uri)):
        load_registered_model(uri, tracking_uri=mlflow_server.uri)


def test_missing_artifact_path_of_an_existing_run(mlflow_server, registered, no_global_uri):
    run_id = registered.get_model_version(NAME, "1").run_id
    with pytest.raises(ModelNotFoundError):
        load_registered_model(f"runs:/{run_id}/no/such/model", tracking_uri=mlflow_server.uri)


def test_local_directory_without_a_model(tmp_path):
    only_config = tmp_path / "only_config"
    write_model_dir(only_config, {"a": 1}, {"w": torch.zeros(2)})
    for weights in only_config.glob("weights.*"):
        weights.unlink()
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty", only_config):
        with pytest.raises(ModelNotFoundError, match=re.escape(str(path))):
            load_registered_model(str(path))
    write_model_dir(tmp_path / "ok", {"a": 1}, {"w": torch.ones(2)})
    assert load_registered_model(str(tmp_path / "ok"))[0] == {"a": 1}


def test_refused_connection_fails_fast_whatever_the_environment(monkeypatch):
    # MLflow's own defaults (7 retries with exponential backoff, 120 s timeout) would take minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    uri = f"http://127.0.0.1:{_closed_port()}"
    t = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=re.escape(uri)):
        load_registered_model(f"models:/{NAME}@latest", tracking_uri=uri)
    assert time.monotonic() - t < 30
    # The bounded settings applied to this call only.
    assert [os.environ[k] for k in HTTP_ENV] == ["120", "7"]


def test_server_that_never_answers_times_out(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel accepts connections; nobody reads the requests
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        t = time.monotonic()
        with pytest.raises(TrackingUnavailableError):
            load_registered_model(f"models:/{NAME}/1", tracking_uri=uri, request_timeout_s=1, max_retries=1)
        assert time.monotonic() - t < 15


class _FixedStatus(BaseHTTPRequestHandler):
    status = 503
    body = b"<html>busy</html>"
    requests = 0

    def do_GET(self):  # noqa: N802
        type(self).requests += 1
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, attempts", [(503, 2), (404, 1)])
def test_http_errors_that_are_not_an_mlflow_answer(status, attempts):
    """A proxy's 5xx is retried by MLflow, then reported unavailable; an HTML 404 means no MLflow API at that URI,
    never a missing model."""
    handler = type("Handler", (_FixedStatus,), {"status": status, "requests": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(TrackingUnavailableError):
            load_registered_model(f"models:/{NAME}@latest", tracking_uri=f"http://127.0.0.1:{server.server_port}",
                                  request_timeout_s=2, max_retries=1)
    finally:
        server.shutdown()
        server.server_close()
    assert handler.requests == attempts


def test_stopped_server(mlflow_server, registered, no_global_uri):
    uri = f"models:/{NAME}@latest"
    _assert_same(load_registered_model(uri, tracking_uri=mlflow_server.uri)[1], _state_dict(2))
    mlflow_server.stop()
    try:
        t = time.monotonic()
        with pytest.raises(TrackingUnavailableError) as err:
            load_registered_model(uri, tracking_uri=mlflow_server.uri)
        assert time.monotonic() - t < 30
        assert not isinstance(err.value, LookupError)
    finally:
        mlflow_server.start()  # the server is shared by the whole session
    config, _ = load_registered_model(uri, tracking_uri=mlflow_server.uri, dst=Path.cwd() / "m")
    assert config == {"version": 2} and (Path.cwd() / "m" / "config.json").is_file()
