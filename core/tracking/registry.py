"""Loading a logged model back (`load_registered_model`) and the two errors a caller can act on.

``models:/`` URIs are resolved by MLflow's own resolver (aliases, including the reserved ``latest``; versions;
``/latest``; stages; logged-model ids) on a client bound to the given tracking URI. MLflow 3.17's
``mlflow.artifacts.download_artifacts("models:/...", tracking_uri=...)`` resolves the name through the process-wide
registry URI instead and would answer "not found" from the wrong store, so only the resolved artifact URI is handed
to it. Failures are sorted: `ModelNotFoundError` when the server says the model, version, alias or run does not
exist (a job may then train it), `TrackingUnavailableError` when the server could not be asked. Anything else
(bad credentials, a malformed URI, a corrupt model) propagates unchanged. Each load runs with a bounded per-request
timeout and retry count, so a dead server fails it in seconds, not minutes.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from core.tracking.config import TrackingConfig, _http_settings, resolve_tracking_uri
from core.tracking.model_files import read_model_dir

# Worst case against a server that accepts connections but never answers: (1 + retries) * timeout plus MLflow's
# backoff (about 5 s for 2 retries), i.e. ~35 s; a refused connection fails after the backoff alone.
_LOAD_REQUEST_TIMEOUT_S = 10.0
_LOAD_MAX_RETRIES = 2


class ModelNotFoundError(LookupError):
    """The tracking server answered that the model, version, alias or run does not exist, or a local directory
    holds no model files."""


class TrackingUnavailableError(RuntimeError):
    """The tracking server could not be asked: connection refused, timeouts, 5xx after MLflow's retries, or no MLflow
    API at the URI."""


@dataclass(frozen=True)
class ModelSource:
    """Where a loaded model was logged: the MLflow run and, for a registered model, its name and version (None
    where the reference does not say, e.g. a local directory)."""

    uri: str  # the reference as given
    run_id: str | None = None  # the run that logged it
    name: str | None = None  # registered model name
    version: str | None = None  # registered model version


def load_registered_model(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None, *,
                          request_timeout_s: float = _LOAD_REQUEST_TIMEOUT_S,
                          max_retries: int = _LOAD_MAX_RETRIES) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load (config, state_dict) logged by `Tracker.log_model` or written by `write_model_dir`.

    `uri`: ``models:/<name>@<alias>`` (``@latest`` = newest version), ``models:/<name>/<version|latest>``,
    ``runs:/<run_id>/<artifact path>``, any artifact URI MLflow can download, or a local model directory.
    Files are downloaded into `dst` (kept) or a temporary directory (removed). `tracking_uri` defaults to
    `resolve_tracking_uri(TrackingConfig())`, i.e. $MLFLOW_TRACKING_URI or ./mlruns. Each HTTP request waits at
    most `request_timeout_s` and is retried `max_retries` times (MLflow's settings, for this call only).

    Raises `ModelNotFoundError` or `TrackingUnavailableError` as described in their docstrings.
    """
    config, state, _ = load_model_with_source(uri, dst, tracking_uri, request_timeout_s=request_timeout_s,
                                              max_retries=max_retries, resolve_source=False)
    return config, state


def load_model_with_source(uri: str, dst: str | Path | None = None, tracking_uri: str | None = None, *,
                           request_timeout_s: float = _LOAD_REQUEST_TIMEOUT_S, max_retries: int = _LOAD_MAX_RETRIES,
                           resolve_source: bool = True) -> tuple[dict, dict[str, torch.Tensor], ModelSource]:
    """`load_registered_model` plus the `ModelSource` of what was loaded: for ``models:/`` the version the alias
    pointed at when it was read (and, with `resolve_source`, that version's run: one more request), for
    ``runs:/`` the run."""
    if "://" not in uri and ":/" not in uri:
        return (*_read(uri, uri), ModelSource(uri))
    import mlflow.artifacts
    from mlflow import MlflowClient

    tracking_uri = tracking_uri or resolve_tracking_uri(TrackingConfig())
    source = ModelSource(uri, run_id=_run_of_runs_uri(uri))
    with _http_settings(request_timeout_s, max_retries), tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        artifact_uri = uri
        if uri.startswith("models:/"):
            with _registry_errors(uri, tracking_uri, resolving=True):
                artifact_uri, source = _resolve_models_uri(client, uri, resolve_source)
        with _registry_errors(uri, tracking_uri, resolving=False):
            # MLflow mirrors the artifact path below dst_path; download to a temporary directory so `dst` gets
            # the model files themselves.
            local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        if dst is not None:
            local = shutil.copytree(local, Path(dst), dirs_exist_ok=True)
        return (*_read(local, uri), source)


def _run_of_runs_uri(uri: str) -> str | None:
    if not uri.startswith("runs:/"):
        return None
    return uri[len("runs:/"):].lstrip("/").split("/", 1)[0] or None


def _resolve_models_uri(client, uri: str, resolve_source: bool) -> tuple[str, ModelSource]:
    """The artifact URI behind a ``models:/`` URI, resolved by MLflow through `client`, and what it names."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    resolved = get_model_name_and_version(client, uri)
    if len(resolved) == 1:  # models:/<model_id>: a logged model, not a registered one
        logged = client.get_logged_model(resolved[0])
        return logged.artifact_location, ModelSource(uri, run_id=getattr(logged, "source_run_id", None))
    name, version = resolved
    run_id = client.get_model_version(name, version).run_id if resolve_source else None
    return client.get_model_version_download_uri(name, version), ModelSource(uri, run_id, name, str(version))


def _read(model_dir: str | Path, uri: str) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        return read_model_dir(model_dir)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ModelNotFoundError(f"no model at {uri}: {exc}") from exc


@contextmanager
def _registry_errors(uri: str, tracking_uri: str, resolving: bool) -> Iterator[None]:
    """Re-raise MLflow failures as ModelNotFoundError / TrackingUnavailableError where they mean that."""
    try:
        yield
    except Exception as exc:
        if _not_found(exc, resolving):
            raise ModelNotFoundError(f"{uri} does not exist at {tracking_uri}: {exc}") from exc
        if _unavailable(exc):
            raise TrackingUnavailableError(f"cannot load {uri}: MLflow at {tracking_uri} is unavailable: {exc}") \
                from exc
        raise


def _not_found(exc: BaseException, resolving: bool) -> bool:
    from mlflow.exceptions import MlflowException, RestException

    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # HTTP 404 from the server, or the same from a local store
        return True
    if resolving and exc.error_code == "INVALID_PARAMETER_VALUE":  # how MLflow answers a missing alias
        return True
    # `models:/<name>/latest` of a registered model without versions: MLflow's resolver raises this one itself,
    # after the server answered, without an error code.
    return resolving and not isinstance(exc, RestException) and str(exc).startswith("No versions of model")


def _unavailable(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, MlflowException) and exc.error_code == "ENDPOINT_NOT_FOUND":
        return True  # a plain HTTP 404 without an MLflow error body: no MLflow API at this URI
    if isinstance(exc, RestException) and exc.get_http_status_code() >= 500:
        return True
    return _transport_failure(exc)


def _transport_failure(exc: BaseException) -> bool:
    """Whether `exc` or what it wraps is a failed connection or a timeout. MLflow re-raises those (and 5xx once
    its retries are spent) as a plain MlflowException chained to the `requests` error."""
    import requests
    import urllib3.exceptions

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, requests.HTTPError) and e.response is not None:
            if e.response.status_code >= 500:
                return True
        elif isinstance(e, (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False
