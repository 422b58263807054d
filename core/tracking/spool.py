"""Delivery of tracking operations: the background sender thread, its in-order outage queue and the on-disk spool.

One daemon thread sends the queue head through an MlflowClient bound to the URI (consecutive metrics coalesced into
one ``log_batch``). A transport failure keeps the head queued: one warning per outage, a retry every
``retry_interval_s``, then everything in the original order with original steps and timestamps. A request the server
rejects (4xx) is dropped with a warning so it cannot block the queue. What is unsent at close goes to
``pending.jsonl`` and is replayed first by the next sender on the same run directory; the file is removed only once
delivered, so a crash repeats operations rather than losing them (MLflow's async logging queues in memory only).
Operations: start, end, params, metrics, tags, artifact, model (upload + register + alias), images (MLflow images
with a step), input (the dataset) and link (the run and registered version of a model a run builds on); the
multi-request ones record their progress in the op, so a retry or a replay resumes instead of repeating.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("vaebm.tracking")

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
_METRICS_PER_BATCH = 1000
_SERVER_ERROR_ATTEMPTS = 5  # a JSON 500 from a reachable server is a bad request, not an outage: give up after this


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
        elif kind == "images":
            self._log_images(client, self._run_id(op), op)
        elif kind == "input":
            self._log_input(client, self._run_id(op), op)
        elif kind == "link":
            self._link(client, self._run_id(op), op)
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
        if run_id == resume_id:
            log.info("MLflow run %s continues (%s)", run_id, self.uri)
        else:
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
            # The source holds an MLmodel (python_function flavor): the version loads with mlflow.pyfunc too.
            mv = client.create_model_version(op["name"], source=f"runs:/{run_id}/{op['artifact_path']}",
                                             run_id=run_id, await_creation_for=0)
            op["version"] = str(mv.version)
        if op["alias"].lower() != "latest":  # 'latest' is reserved and always means the newest version
            client.set_registered_model_alias(op["name"], op["alias"], op["version"])
        shutil.rmtree(Path(op["staged"]).parent, ignore_errors=True)

    def _log_images(self, client, run_id: str, op: dict) -> None:
        """MLflow images (``images/<key>+step+<step>+...``, shown with a step slider); `done` records progress in
        the op so a retry or a replay does not log an image twice."""
        from PIL import Image

        for i in range(op.get("done", 0), len(op["images"])):
            staged, key = op["images"][i]
            path = Path(staged)
            if not path.exists():
                raise _Rejected(f"staged copy {path} is gone")
            with Image.open(path) as img:
                img.load()
                client.log_image(run_id, img, key=key, step=op["step"], timestamp=op["timestamp"], synchronous=True)
            op["done"] = i + 1
        shutil.rmtree(op["staged"], ignore_errors=True)

    def _log_input(self, client, run_id: str, op: dict) -> None:
        """The run's dataset input: a metadata-only MLflow dataset (the shards stay where they are)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        meta = MetaDataset(LocalArtifactDatasetSource(op["source"]), name=op["name"], digest=op["digest"]).to_dict()
        dataset = Dataset(name=meta["name"], digest=meta["digest"], source_type=meta["source_type"],
                          source=meta["source"], profile=json.dumps(op["profile"], sort_keys=True))
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT,
                                                                                  op["context"])])])

    def _link(self, client, run_id: str, op: dict) -> None:
        """Tags and params naming the logged model a run builds on; the missing half (run of a version, version of
        a run) is looked up in the registry."""
        from mlflow.entities import RunTag

        linked_run, name, version = op.get("linked_run_id"), op.get("name"), op.get("version")
        if linked_run is None and name and version:
            linked_run = self._maybe(lambda: client.get_model_version(name, version).run_id)
        if version is None and linked_run:
            found = self._maybe(lambda: client.search_model_versions(f"run_id = '{linked_run}'")) or []
            if found:
                newest = max(found, key=lambda mv: int(mv.version))
                name, version = newest.name, str(newest.version)
        role = op["role"]
        values = {"uri": op["uri"], "run_id": linked_run, "model_name": name, "model_version": version}
        tags = [RunTag(f"vaebm.{role}.{k}", str(v)) for k, v in values.items() if v]
        client.log_batch(run_id, tags=tags, synchronous=True)
        self._log_params(client, run_id, {f"{role}_{k}": str(v) for k, v in values.items() if v and k != "uri"})


# ---------------------------------------------------------------------------------------------------------------
# On-disk spool
# ---------------------------------------------------------------------------------------------------------------

def read_pending(path: Path) -> list[dict]:
    """The operations a previous sender left in `path` (none if there is no file)."""
    if not path.exists():
        return []
    ops = []
    for i, line in enumerate(path.read_text().splitlines()):
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash: skip it, keep the rest
            log.warning("skipping unreadable line %d of %s", i + 1, path)
    return ops


def write_pending(path: Path, ops: list[dict]) -> None:
    """Replace `path` with `ops` (one JSON object a line), or remove it when there is nothing left to send."""
    if not ops:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for op in ops:
            f.write(json.dumps(op) + "\n")
    os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous file
    log.warning("MLflow unreachable at close: %d items saved to %s; the next run in this directory "
                "replays them", len(ops), path)
