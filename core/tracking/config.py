"""Where tracking goes and how MLflow's HTTP client behaves: `TrackingConfig`, `resolve_tracking_uri` and the
MLflow environment variables the project sets.

MLflow reads its per-request timeout and retry count from the process environment on every request; there is no
per-client setting. The background sender turns MLflow's retries off for good (it retries itself), while an explicit
model load sets bounded values only for its own duration, so neither depends on which ran first.
"""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

_HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
_HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_http_env_lock = threading.Lock()


@dataclass
class TrackingConfig:
    # False: every Tracker method is a no-op (no thread, no files, no MLflow import side effects).
    enabled: bool = True
    # MLflow tracking URI; None: $MLFLOW_TRACKING_URI if set, else the embedded sqlite store below.
    tracking_uri: str | None = None
    # Embedded store directory (sqlite `mlflow.db` + `artifacts/`), relative to the working directory.
    local_store: str = "mlruns"
    # Experiment holding the pipeline runs; created on first use.
    experiment: str = "vaebm"
    # Per-HTTP-request timeout while talking to a server (MLflow's own retries are disabled).
    request_timeout_s: float = 5.0
    # How often the background sender retries after a failure.
    retry_interval_s: float = 10.0
    # At close(), how long to wait for pending items before persisting them to pending.jsonl.
    flush_timeout_s: float = 30.0
    # Sample CPU, memory, disk, network (and GPUs where pynvml is installed) into the stage run as system/* metrics.
    system_metrics: bool = True
    # Seconds between two system-metrics samples (a last one is taken when the stage ends).
    system_metrics_interval_s: float = 10.0

    def __post_init__(self):
        # Validated when the config is built, i.e. before ranks start, not when the first retry happens.
        if (self.request_timeout_s <= 0 or self.retry_interval_s <= 0 or self.flush_timeout_s < 0
                or self.system_metrics_interval_s <= 0):
            raise ValueError(f"tracking timeouts must be positive: {self}")
        if not self.experiment:
            raise ValueError("tracking.experiment must be a non-empty name")


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """The URI `Tracker` uses: explicit config, else $MLFLOW_TRACKING_URI, else the embedded sqlite store
    ``sqlite:///<abs(local_store)>/mlflow.db`` with artifacts in ``<abs(local_store)>/artifacts`` (browse it with
    ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``)."""
    if config.tracking_uri:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(config.local_store).resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Experiment artifact root for sqlite stores (next to the db file); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "artifacts")
    return None


def _http_env(request_timeout_s: float, max_retries: int) -> dict[str, str]:
    """MLflow's HTTP settings as its environment variables (the timeout variable is int-typed)."""
    return {_HTTP_TIMEOUT_ENV: str(max(1, math.ceil(request_timeout_s))), _HTTP_RETRIES_ENV: str(int(max_retries))}


def _configure_http(config: TrackingConfig) -> None:
    """Process-wide settings for the background sender, which lives as long as the process."""
    with _http_env_lock:
        # The sender retries itself; MLflow's backoff (minutes by default) would stall its queue.
        os.environ.update(_http_env(config.request_timeout_s, max_retries=0))
    # No tqdm bars or "View run" lines written to stdout from the sender thread into the training log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


@contextmanager
def _http_settings(request_timeout_s: float, max_retries: int) -> Iterator[None]:
    """MLflow's per-request timeout and retry count for the duration of one blocking call.

    Process-wide while it lasts (a running `Tracker` sender uses them too). The previous values come back
    afterwards, unless something else (e.g. a `Tracker` being created in another thread) set its own meanwhile.
    """
    if request_timeout_s <= 0 or max_retries < 0:
        raise ValueError(f"need request_timeout_s > 0 and max_retries >= 0, got {request_timeout_s}, {max_retries}")
    new = _http_env(request_timeout_s, max_retries)
    with _http_env_lock:
        old = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
    try:
        yield
    finally:
        with _http_env_lock:
            for k, v in old.items():
                if os.environ.get(k) != new[k]:
                    continue
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
