"""MLflow tracking for vaebm: every MLflow call of the project goes through this module, on rank 0 only.

Decision (shared/DESIGN.md): **MLflow failure costs telemetry, never the run.** Hence:

* The training thread never talks to MLflow. `Tracker` methods only validate, snapshot (artifacts and model
  weights are copied at call time) and append an operation to an in-memory queue, which costs microseconds.
  One daemon thread (`_Sender`) sends the queue head in order through an `MlflowClient` bound to the resolved
  URI (no fluent/global run state). Consecutive metric calls are coalesced into one `log_batch`.
* A transport failure (server down, timeout, 5xx from a proxy) leaves the head where it is: the sender warns
  once per outage on logger ``vaebm.tracking``, retries every ``retry_interval_s`` and then replays everything in
  the original order, metrics with their original steps and timestamps. A request the server rejects (4xx, e.g.
  a parameter whose value changed on resume) is dropped with a warning so it cannot block the queue forever.
* ``close()`` waits up to ``flush_timeout_s``; whatever is still unsent is written to
  ``<run_dir>/tracking/pending.jsonl`` (artifacts by their staged copy under ``<run_dir>/tracking/staging/``) and
  replayed first by the next `Tracker` on the same run directory. The file is removed only once its operations
  are delivered, so a crash during replay repeats them rather than losing them.
* MLflow's own HTTP retries (minutes of backoff by default) are switched off and each request is bounded by
  ``request_timeout_s``: retrying is the sender's job, so one dead request can delay the queue by seconds only.

Runs: one parent run per pipeline (tag ``vaebm.pipeline``) and one nested run per stage (tags ``vaebm.pipeline``,
``vaebm.stage``, ``mlflow.parentRunId``). Runs are created by the sender too; `Tracker.start` waits for their ids
at most ``request_timeout_s`` (longer for a local store) and returns ``None`` for ids not known yet. Logging done
before the runs exist is queued behind their creation, so it lands in them once they do. Store the ids from
`Tracker.run_ids` in each checkpoint (they fill in once the server answers); passing them back to `start`
continues the same runs after preemption.

Tracking URI: ``TrackingConfig.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store
``sqlite:///<abs(local_store)>/mlflow.db`` (default ``./mlruns/mlflow.db``) with artifacts in
``<abs(local_store)>/artifacts`` -- browse it with ``mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db``.

Models: `Tracker.log_model` logs ``config.json`` + weights (``weights.safetensors`` when `safetensors` is installed,
else ``weights.pt`` readable with ``torch.load(weights_only=True)``) under artifact path
``model/<name>/<UTC time>/`` (unique per call, so a later version never overwrites an earlier one's files),
registers version N of model ``name`` with that source and points ``alias`` at it. MLflow reserves the alias
``latest`` and resolves ``models:/<name>@latest`` / ``models:/<name>/latest`` to the newest version itself, so the
default alias needs no call. `load_registered_model` reads such a model back without unpickling anything.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger("vaebm.tracking")

_PARAM_VALUE_MAX = 500  # longer values are cut (with a marker) so configs stay readable in the UI
_TAG_VALUE_MAX = 5000  # below MLflow's 8000-char tag limit
_KEY_MAX = 250  # MLflow's entity key limit
_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_METRICS_PER_BATCH = 1000
_SERVER_ERROR_ATTEMPTS = 5  # a JSON 500 from a reachable server is a bad request, not an outage: give up after this
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_WEIGHTS_SAFETENSORS = "weights.safetensors"
_WEIGHTS_TORCH = "weights.pt"
_CONFIG_FILE = "config.json"


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

    def __post_init__(self):
        # Validated when the config is built, i.e. before ranks start, not when the first retry happens.
        if self.request_timeout_s <= 0 or self.retry_interval_s <= 0 or self.flush_timeout_s < 0:
            raise ValueError(f"tracking timeouts must be positive: {self}")
        if not self.experiment:
            raise ValueError("tracking.experiment must be a non-empty name")


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """The URI `Tracker` uses: explicit config, else $MLFLOW_TRACKING_URI, else the embedded sqlite store."""
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


def _configure_http(config: TrackingConfig) -> None:
    # MLflow reads these per request. Process-global, but all MLflow traffic of the project goes through here.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(config.request_timeout_s)))  # int-typed var
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # the sender retries; MLflow's backoff would stall it
    # No tqdm bars or "View run" lines written to stdout from the sender thread into the training log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


# ---------------------------------------------------------------------------------------------------------------
# Value normalisation (training thread)
# ---------------------------------------------------------------------------------------------------------------

def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _key(name: str) -> str:
    """A key MLflow accepts (characters, no path tricks, length); a rejected key would drop its whole batch."""
    k = re.sub(r"/+", "/", re.sub(r"[^/\w.\- :]", "_", name)).strip("/")[:_KEY_MAX] or "_"
    norm = posixpath.normpath(k)
    if norm != k or norm in (".", "..") or norm.startswith(("/", "../")):
        k = "_" + k.replace("/", "_")
    return k[:_KEY_MAX]


def _truncate(value: Any, limit: int) -> str:
    s = str(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------------------------
# Error classification (sender thread)
# ---------------------------------------------------------------------------------------------------------------

class _Rejected(Exception):
    """An operation that can never succeed (its run was never created, its staged file vanished)."""


def _status_code(exc: BaseException) -> int | None:
    from mlflow.exceptions import MlflowException

    return exc.get_http_status_code() if isinstance(exc, MlflowException) else None


def _is_server_error(exc: BaseException) -> bool:
    """A 5xx carrying an MLflow JSON error body: the server is up and failed on this request."""
    from mlflow.exceptions import RestException

    return isinstance(exc, RestException) and (_status_code(exc) or 0) >= 500


def _is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: transport errors, timeouts, 5xx/429, local store I/O trouble."""
    if isinstance(exc, _Rejected):
        return False
    code = _status_code(exc)
    if code is not None:
        # MLflow wraps connection errors and timeouts as INTERNAL_ERROR (500) without a response body.
        return code >= 500 or code in (408, 429)
    import requests

    return isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError, OSError)) or (
        type(exc).__module__.startswith("sqlalchemy")  # e.g. "database is locked" on the embedded store
    )


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


# ---------------------------------------------------------------------------------------------------------------
# Background sender
# ---------------------------------------------------------------------------------------------------------------

class _Sender:
    """Owns the queue, the local-key -> run-id map and the only MlflowClient; runs on one daemon thread.

    Operations are JSON-safe dicts so that the unsent tail can be persisted verbatim. They name their run by a
    local key (a uuid handed out at `start`) or, once known or when replayed from disk, by ``run_id``.
    """

    def __init__(self, uri: str, retry_interval_s: float, pending_file: Path):
        self.uri = uri
        self.retry_interval_s = retry_interval_s
        self.pending_file = pending_file
        self._cond = threading.Condition()
        self._ops: deque[dict] = deque()
        self.ids: dict[str, str] = {}
        self._replay_left = 0  # ops at the queue head that came from pending_file
        self._stop = False
        self._wake = False
        self._down = False
        self._server_errors = 0  # consecutive JSON 5xx on the current head
        self.sent = 0
        self.failures = 0
        self.dropped = 0
        self._client = None
        self._experiments: dict[str, str] = {}
        self._thread = threading.Thread(target=self._loop, name="vaebm-tracking", daemon=True)

    # -- training-thread side ---------------------------------------------------------------------------------
    def preload(self, ops: list[dict]) -> None:
        with self._cond:
            self._ops.extendleft(reversed(ops))
            self._replay_left = len(ops)

    def start(self) -> None:
        self._thread.start()

    def put(self, op: dict) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def flush(self, timeout: float) -> bool:
        """Retry now (skipping the retry interval) and wait until the queue is empty."""
        with self._cond:
            self._wake = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: not self._ops, timeout)

    def stop(self, join_timeout: float) -> list[dict]:
        """Stop the thread and return the unsent operations with every known run id filled in."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # A request in flight finishes within the HTTP timeout; if it doesn't, persisting its op anyway means a
        # possible duplicate on replay, never a loss.
        self._thread.join(join_timeout)
        with self._cond:
            return [self._resolved(op) for op in self._ops]

    def _resolved(self, op: dict) -> dict:
        op = dict(op)
        if op.get("key") in self.ids and op["op"] != "start":
            op["run_id"] = self.ids[op["key"]]
        if op.get("parent_key") in self.ids:
            op["parent_id"] = self.ids[op["parent_key"]]
        return op

    @property
    def down(self) -> bool:
        return self._down

    def stats(self) -> dict:
        with self._cond:
            return {"pending": len(self._ops), "sent": self.sent, "failures": self.failures,
                    "dropped": self.dropped, "connected": not self._down}

    # -- sender-thread side -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._ops or self._stop)
                if self._stop:
                    return
                batch = self._head_batch()
            try:
                self._send(batch)
                done = len(batch)
            except Exception as exc:  # noqa: BLE001 -- any failure here must stay inside this thread
                if _is_transient(exc) and not (
                        _is_server_error(exc) and self._server_errors + 1 >= _SERVER_ERROR_ATTEMPTS):
                    self._server_errors = self._server_errors + 1 if _is_server_error(exc) else 0
                    self._on_failure(exc)
                    continue
                log.warning("MLflow rejected %s for run %s; dropping it: %s", batch[0]["op"],
                            batch[0].get("run_id") or batch[0].get("key"), exc)
                with self._cond:
                    self.dropped += len(batch)
                done = len(batch)
            self._server_errors = 0
            self._pop(done)

    def _head_batch(self) -> list[dict]:
        """The head op, plus the metric ops right behind it for the same run (one log_batch)."""
        head = self._ops[0]
        batch = [head]
        if head["op"] == "metrics":
            n = len(head["metrics"])
            for op in list(self._ops)[1:]:
                same_run = (op.get("run_id"), op.get("key")) == (head.get("run_id"), head.get("key"))
                if op["op"] != "metrics" or not same_run or n + len(op["metrics"]) > _METRICS_PER_BATCH:
                    break
                batch.append(op)
                n += len(op["metrics"])
        return batch

    def _pop(self, n: int) -> None:
        with self._cond:
            for _ in range(n):
                self._ops.popleft()
            self.sent += n
            if self._down:
                self._down = False
                log.warning("MLflow at %s is reachable again; sending %d queued items", self.uri, len(self._ops))
            if self._replay_left:
                self._replay_left = max(0, self._replay_left - n)
                if not self._replay_left:
                    self.pending_file.unlink(missing_ok=True)  # everything it held is delivered
            self._cond.notify_all()

    def _on_failure(self, exc: BaseException) -> None:
        with self._cond:
            self.failures += 1
            if not self._down:
                self._down = True
                log.warning("MLflow at %s unavailable (%s); training continues, %d items queued, retrying every "
                            "%g s", self.uri, exc, len(self._ops), self.retry_interval_s)
            self._cond.notify_all()  # start() may be waiting to learn that the server is down
            self._cond.wait_for(lambda: self._stop or self._wake, self.retry_interval_s)
            self._wake = False

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            # Creating the client opens (and on first use migrates) a sqlite store: done here, off the
            # training thread. The registry lives in the same store/server.
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _run_id(self, op: dict) -> str:
        rid = op.get("run_id") or self.ids.get(op.get("key"))
        if rid is None:
            raise _Rejected("its run was never created")
        return rid

    def _send(self, batch: list[dict]) -> None:
        op = batch[0]
        kind = op["op"]
        client = self._mlflow()
        if kind == "start":
            self._start_run(client, op)
        elif kind == "metrics":
            from mlflow.entities import Metric

            rid = self._run_id(op)
            metrics = [Metric(k, v, ts, step) for o in batch for k, v, ts, step in o["metrics"]]
            for i in range(0, len(metrics), _METRICS_PER_BATCH):
                client.log_batch(rid, metrics=metrics[i:i + _METRICS_PER_BATCH], synchronous=True)
        elif kind == "params":
            self._log_params(client, self._run_id(op), op["params"])
        elif kind == "tags":
            from mlflow.entities import RunTag

            tags = [RunTag(k, v) for k, v in op["tags"].items()]
            for i in range(0, len(tags), _PARAMS_PER_BATCH):
                client.log_batch(self._run_id(op), tags=tags[i:i + _PARAMS_PER_BATCH], synchronous=True)
        elif kind == "artifact":
            self._log_artifact(client, self._run_id(op), op)
        elif kind == "model":
            self._log_model(client, self._run_id(op), op)
        elif kind == "end":
            client.set_terminated(self._run_id(op), status=op["status"], end_time=op["end_time"])
        else:
            raise _Rejected(f"unknown operation {kind!r}")

    def _experiment_id(self, client, name: str, artifact_location: str | None) -> str:
        if name not in self._experiments:
            from mlflow.exceptions import MlflowException

            exp = client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = client.create_experiment(name, artifact_location=artifact_location)
                except MlflowException as exc:
                    if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                        raise
                    self._experiments[name] = client.get_experiment_by_name(name).experiment_id
            else:
                if exp.lifecycle_stage == "deleted":  # a deleted name cannot be re-created; bring it back
                    client.restore_experiment(exp.experiment_id)
                self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def _start_run(self, client, op: dict) -> None:
        resume_id = op.get("resume_id")
        if resume_id is None and op.get("parent_of"):
            # Resuming a stage run without its parent id: the parent is recorded on the stage run itself.
            resume_id = self._maybe(lambda: client.get_run(op["parent_of"]).data.tags.get("mlflow.parentRunId"))
        run_id = None
        if resume_id:
            if self._maybe(lambda: client.update_run(resume_id, status="RUNNING"), ok=True):
                run_id = resume_id
            else:
                log.warning("cannot resume MLflow run %s (missing or deleted); starting a new %s run",
                            resume_id, op["name"])
        if run_id is None:
            tags = dict(op["tags"])
            parent = op.get("parent_id") or self.ids.get(op.get("parent_key"))
            if parent:
                tags["mlflow.parentRunId"] = parent
            exp_id = self._experiment_id(client, op["experiment"], op.get("artifact_location"))
            run_id = client.create_run(exp_id, tags=tags, run_name=op["name"]).info.run_id
        with self._cond:
            self.ids[op["key"]] = run_id
            self._cond.notify_all()
        log.info("MLflow run %r: %s (%s)", op["name"], run_id, self.uri)

    @staticmethod
    def _maybe(fn, ok: Any = None):
        """fn()'s result (or `ok`), None when MLflow rejects it; transient errors propagate (retry later)."""
        try:
            result = fn()
            return ok if ok is not None else result
        except Exception as exc:  # noqa: BLE001
            if _is_transient(exc):
                raise
            return None

    def _log_params(self, client, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            chunk = items[i:i + _PARAMS_PER_BATCH]
            try:
                client.log_batch(run_id, params=chunk, synchronous=True)
            except Exception as exc:  # noqa: BLE001
                if _is_transient(exc):
                    raise
                # Typically a resumed run whose config changed (MLflow params are immutable): keep the others.
                for p in chunk:
                    try:
                        client.log_batch(run_id, params=[p], synchronous=True)
                    except Exception as one:  # noqa: BLE001
                        if _is_transient(one):
                            raise
                        log.warning("MLflow rejected param %s=%r: %s", p.key, p.value, one)
                        with self._cond:
                            self.dropped += 1

    @staticmethod
    def _staged(op: dict) -> Path:
        path = Path(op["staged"])
        if not path.exists():
            raise _Rejected(f"staged copy {path} is gone")
        return path

    def _log_artifact(self, client, run_id: str, op: dict) -> None:
        path = self._staged(op)
        if path.is_dir():
            client.log_artifacts(run_id, str(path), posixpath.join(op["artifact_path"] or "", path.name))
        else:
            client.log_artifact(run_id, str(path), op["artifact_path"])
        shutil.rmtree(path.parent, ignore_errors=True)  # the per-call staging directory

    def _log_model(self, client, run_id: str, op: dict) -> None:
        from mlflow.exceptions import MlflowException

        # Each step records its completion in the op, so a retry (or a replay from disk) resumes after it
        # instead of registering a second version.
        if not op.get("uploaded"):
            client.log_artifacts(run_id, str(self._staged(op)), op["artifact_path"])
            op["uploaded"] = True
        if not op.get("version"):
            try:
                client.create_registered_model(op["name"])
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
            # A plain artifact directory is a valid source: no MLmodel file is needed to register it.
            mv = client.create_model_version(op["name"], source=f"runs:/{run_id}/{op['artifact_path']}",
                                             run_id=run_id, await_creation_for=0)
            op["version"] = str(mv.version)
        if op["alias"].lower() != "latest":  # 'latest' is reserved and always means the newest version
            client.set_registered_model_alias(op["name"], op["alias"], op["version"])
        shutil.rmtree(Path(op["staged"]).parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------

_live_trackers: "weakref.WeakSet[Tracker]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # The sender is a daemon thread: without this, a script that forgets close() would lose its queue.
    for tracker in list(_live_trackers):
        tracker.close()


class Tracker:
    """Rank-0 MLflow logging that never blocks or fails training. Non-rank-0 or disabled: every call is a no-op.

    Typical use::

        tracker = Tracker(cfg.tracking, run_dir, is_rank0=dist.is_rank0())
        tracker.start("vaebm-celeba", "stage2", run_id=ckpt.get("mlflow_run_id"),
                      parent_run_id=ckpt.get("mlflow_parent_run_id"))
        tracker.log_params(cfg_dict); tracker.log_metrics({"loss": l}, step=images_seen)
        ckpt["mlflow_parent_run_id"], ckpt["mlflow_run_id"] = tracker.run_ids
        tracker.end("FINISHED"); tracker.close()

    One Tracker per run directory at a time (it owns ``<run_dir>/tracking/``).
    """

    def __init__(self, config: TrackingConfig, run_dir: str | Path, is_rank0: bool):
        self.config = config
        self.active = bool(config.enabled and is_rank0)
        self.run_dir = Path(run_dir)
        self.uri: str | None = None
        self._pipeline: str | None = None
        self._parent_key: str | None = None
        self._stage_key: str | None = None
        self._closed = False
        self._sender: _Sender | None = None
        self._warned: set[str] = set()
        if not self.active:
            return
        self.uri = resolve_tracking_uri(config)
        # Recorded in each start op so a replay from pending.jsonl creates runs where they were meant to go.
        self._where = {"experiment": config.experiment, "artifact_location": _artifact_location(self.uri)}
        _configure_http(config)
        self._dir = self.run_dir / "tracking"
        self._staging = self._dir / "staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        self._sender = _Sender(self.uri, config.retry_interval_s, self._dir / "pending.jsonl")
        replay = self._read_pending()
        if replay:
            log.info("replaying %d MLflow operations left over in %s", len(replay), self._sender.pending_file)
            self._sender.preload(replay)
        self._sender.start()
        _live_trackers.add(self)

    # -- runs ---------------------------------------------------------------------------------------------------
    def start(self, pipeline: str, stage: str, run_id: str | None = None,
              parent_run_id: str | None = None) -> tuple[str | None, str | None]:
        """Open (or, given ids from a checkpoint, resume) the pipeline's parent run and the stage's nested run.

        Calling it again for another stage of the same pipeline reuses this tracker's parent run. Returns
        ``(parent_run_id, stage_run_id)``; an id is None if the server did not create the run within
        ``request_timeout_s`` -- it is created (and everything logged meanwhile replayed into it) once the server
        answers, and `run_ids` reports it from then on.
        """
        if not self.active:
            return None, None
        if parent_run_id is not None or self._parent_key is None or pipeline != self._pipeline:
            self._parent_key = uuid.uuid4().hex
            self._pipeline = pipeline
            self._put({"op": "start", "key": self._parent_key, "name": pipeline, "resume_id": parent_run_id,
                       **self._where,
                       # resuming only the stage run: find its parent from the run itself
                       "parent_of": run_id if parent_run_id is None else None,
                       "tags": {"vaebm.pipeline": pipeline}})
        self._stage_key = uuid.uuid4().hex
        self._put({"op": "start", "key": self._stage_key, "name": stage, "resume_id": run_id, **self._where,
                   "parent_key": self._parent_key, "tags": {"vaebm.pipeline": pipeline, "vaebm.stage": stage}})
        sender, key = self._sender, self._stage_key
        failures, dropped = sender.failures, sender.dropped
        # A local store never hangs on the network but may need seconds to create/migrate its database.
        local = not self.uri.startswith(("http://", "https://"))
        wait_s = max(self.config.request_timeout_s, self.config.flush_timeout_s if local else 0.0)
        # Known outage: don't wait at all; otherwise until the id is known or the first attempt failed.
        sender.wait_for(lambda: key in sender.ids or sender.failures > failures or sender.dropped > dropped
                        or sender.down, wait_s)
        return self.run_ids

    @property
    def run_ids(self) -> tuple[str | None, str | None]:
        """(parent_run_id, stage_run_id) as far as known now; store these in checkpoints."""
        if not self.active:
            return None, None
        ids = self._sender.ids
        return ids.get(self._parent_key), ids.get(self._stage_key)

    def end_stage(self, status: str = "FINISHED") -> None:
        """Terminate the stage run."""
        self._end(self._stage_key, status)

    def end_pipeline(self, status: str = "FINISHED") -> None:
        """Terminate the parent run (a later stage resuming it by id marks it RUNNING again)."""
        self._end(self._parent_key, status)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the stage run and the parent run with `status` (FINISHED, FAILED or KILLED)."""
        self.end_stage(status)
        self.end_pipeline(status)

    def _end(self, key: str | None, status: str) -> None:
        status = status.upper()
        if status not in _TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {_TERMINAL_STATUSES}, got {status!r}")
        if self.active and key is not None:
            self._put({"op": "end", "key": key, "status": status, "end_time": _now_ms()})

    # -- logging --------------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping) -> None:
        """Log params on the stage run: nested dicts flattened with '.', values stringified and cut at 500 chars."""
        if self._ready("log_params"):
            flat = {_key(k): _truncate(v, _PARAM_VALUE_MAX) for k, v in _flatten(params).items()}
            self._put({"op": "params", "key": self._stage_key, "params": flat})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at `step` on the stage run; NaN/inf are kept (MLflow stores them)."""
        if not self._ready("log_metrics"):
            return
        ts = _now_ms()
        entries = []
        for k, v in _flatten(metrics).items():
            try:
                entries.append([_key(k), float(v), ts, int(step)])
            except (TypeError, ValueError, RuntimeError):  # e.g. a string or a non-scalar tensor
                self._warn_once(f"metric:{k}", "metric %r is not a scalar (%r); not logged", k, type(v).__name__)
        if entries:
            self._put({"op": "metrics", "key": self._stage_key, "metrics": entries})

    def set_tags(self, tags: Mapping) -> None:
        """Set tags on the stage run (flattened like params)."""
        if self._ready("set_tags"):
            flat = {_key(k): _truncate(v, _TAG_VALUE_MAX) for k, v in _flatten(tags).items()}
            self._put({"op": "tags", "key": self._stage_key, "tags": flat})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory to the stage run, as it is now: it is copied to a staging area first."""
        if not self._ready("log_artifact"):
            return
        src = Path(path)
        try:
            dst = self._new_stage_dir() / src.name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
        except OSError as exc:
            log.warning("cannot stage artifact %s (%s); not logged", src, exc)
            return
        self._put({"op": "artifact", "key": self._stage_key, "staged": str(dst), "artifact_path": artifact_path})

    def log_model(self, name: str, config: dict, state_dict: Mapping[str, torch.Tensor], alias: str = "latest",
                  extra_files: Mapping[str, str | bytes] | None = None) -> None:
        """Log config.json + weights (+ extra_files) under ``model/<name>/<UTC time>/`` of the stage run, register
        them as a new version of registered model `name` and point `alias` at it.

        The weights are copied to CPU and written at call time, so training may keep updating them.
        """
        if not self._ready("log_model"):
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        try:
            model_dir = self._new_stage_dir() / "model"
            write_model_dir(model_dir, config, state_dict, extra_files)
        except (OSError, TypeError, ValueError, RuntimeError) as exc:
            log.warning("cannot write model %s for logging (%s); not logged", name, exc)
            return
        self._put({"op": "model", "key": self._stage_key, "name": name, "alias": alias,
                   "staged": str(model_dir), "artifact_path": f"model/{_key(name)}/{stamp}"})

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Retry now and wait (at most `timeout_s`, default flush_timeout_s) until everything is sent."""
        if not self.active or self._closed:
            return True
        return self._sender.flush(self.config.flush_timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Flush for up to flush_timeout_s, then persist what is unsent to <run_dir>/tracking/pending.jsonl."""
        if not self.active or self._closed:
            return
        self._closed = True
        _live_trackers.discard(self)
        self._sender.flush(self.config.flush_timeout_s)
        unsent = self._sender.stop(join_timeout=self.config.request_timeout_s + 1.0)
        path = self._sender.pending_file
        if unsent:
            tmp = path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                for op in unsent:
                    f.write(json.dumps(op) + "\n")
            os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous file
            log.warning("MLflow unreachable at close: %d items saved to %s; the next run in this directory "
                        "replays them", len(unsent), path)
        else:
            path.unlink(missing_ok=True)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> dict:
        """{'pending', 'sent', 'failures' (failed attempts), 'dropped' (rejected items), 'connected'}."""
        if not self.active:
            return {"pending": 0, "sent": 0, "failures": 0, "dropped": 0, "connected": False}
        return self._sender.stats()

    # -- helpers --------------------------------------------------------------------------------------------------
    def _put(self, op: dict) -> None:
        if self._closed:
            self._warn_once("closed", "Tracker is closed; %s not logged", op["op"])
            return
        self._sender.put(op)

    def _ready(self, what: str) -> bool:
        if not self.active:
            return False
        if self._stage_key is None:
            self._warn_once("nostart", "%s called before Tracker.start(); ignored", what)
            return False
        return True

    def _warn_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _new_stage_dir(self) -> Path:
        d = self._staging / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    def _read_pending(self) -> list[dict]:
        path = self._sender.pending_file
        if not path.exists():
            return []
        ops = []
        for i, line in enumerate(path.read_text().splitlines()):
            try:
                ops.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a crash: skip it, keep the rest
                log.warning("skipping unreadable line %d of %s", i + 1, path)
        return ops


# ---------------------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------------------

def _safetensors():
    try:
        import safetensors.torch

        return safetensors.torch
    except ImportError:
        return None


def write_model_dir(model_dir: str | Path, config: dict, state_dict: Mapping[str, torch.Tensor],
                    extra_files: Mapping[str, str | bytes] | None = None) -> Path:
    """Write the model directory format read by `load_registered_model` (config.json + weights + extras)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / _CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    # Contiguous CPU clones: a snapshot training can't mutate, compact storage (views would save their whole
    # base tensor), and no shared storage (safetensors refuses tied weights).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    st = _safetensors()
    if st is not None:
        st.save_file(tensors, str(model_dir / _WEIGHTS_SAFETENSORS))
    else:
        torch.save(tensors, model_dir / _WEIGHTS_TORCH)
    for fname, content in (extra_files or {}).items():
        target = (model_dir / fname).resolve()
        if model_dir.resolve() not in target.parents or fname in (_CONFIG_FILE, _WEIGHTS_SAFETENSORS, _WEIGHTS_TORCH):
            raise ValueError(f"extra file name {fname!r} must be a new relative path inside the model directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    return model_dir


def read_model_dir(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) from a model directory; tensors are loaded without unpickling arbitrary objects."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / _CONFIG_FILE).read_text())
    if (model_dir / _WEIGHTS_SAFETENSORS).exists():
        st = _safetensors()
        if st is None:
            raise ImportError(f"{model_dir / _WEIGHTS_SAFETENSORS} needs the `safetensors` package")
        state = st.load_file(str(model_dir / _WEIGHTS_SAFETENSORS), device="cpu")
    elif (model_dir / _WEIGHTS_TORCH).exists():
        state = torch.load(model_dir / _WEIGHTS_TORCH, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {_WEIGHTS_SAFETENSORS} or {_WEIGHTS_TORCH} in {model_dir}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{model_dir}: weights are not a flat dict of tensors")
    return config, dict(state)


def _model_version(client, name: str, ref: str, by_alias: bool) -> str:
    if ref.lower() == "latest":  # reserved alias / keyword: the newest version
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise LookupError(f"registered model {name!r} has no versions")
        return str(max(int(v.version) for v in versions))
    if by_alias:
        return str(client.get_model_version_by_alias(name, ref).version)
    return ref


def load_registered_model(uri: str, dst: str | Path | None = None,
                          tracking_uri: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load (config, state_dict) logged by `Tracker.log_model`.

    `uri`: ``models:/<name>@<alias>`` (``@latest`` = newest version), ``models:/<name>/<version|latest>``,
    ``runs:/<run_id>/<artifact path>``, any artifact URI MLflow can download, or a local model directory.
    Files are downloaded into `dst` (kept) or a temporary directory (removed). `tracking_uri` defaults to
    `resolve_tracking_uri(TrackingConfig())`, i.e. $MLFLOW_TRACKING_URI or ./mlruns.
    """
    if "://" not in uri and ":/" not in uri:
        return read_model_dir(uri)
    from mlflow import MlflowClient
    import mlflow.artifacts

    # An explicit, blocking load: MLflow's own HTTP retries are welcome here, so the env is left as it is.
    tracking_uri = tracking_uri or resolve_tracking_uri(TrackingConfig())
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    source = uri
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, ref = rest.rsplit("@", 1)
            version = _model_version(client, name, ref, by_alias=True)
        else:
            name, _, ref = rest.partition("/")
            version = _model_version(client, name, ref or "latest", by_alias=False)
        source = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow mirrors the artifact path below dst_path; download to a temporary directory so `dst` gets the
        # model files themselves.
        if source.startswith("runs:/"):
            run_id, _, path = source[len("runs:/"):].partition("/")
            local = client.download_artifacts(run_id, path, tmp)
        else:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                        tracking_uri=tracking_uri)
        if dst is not None:
            local = shutil.copytree(local, Path(dst), dirs_exist_ok=True)
        return read_model_dir(local)
