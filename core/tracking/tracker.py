"""The `Tracker` facade: rank-0 MLflow logging of runs, params, metrics, tags, images, datasets, artifacts and models
that never blocks or fails training.

Its methods only validate and normalise values, snapshot files and weights (copied at call time) and queue an
operation for the background sender (`core.tracking.spool`), which costs microseconds on the training thread.
Runs: one parent run per pipeline (tag ``vaebm.pipeline``) and one nested run per stage (tags ``vaebm.pipeline``,
``vaebm.stage``, ``mlflow.parentRunId``), named ``<method>-<dataset>-<short id>`` and tagged with their origin
(`core.tracking.context`); their ids, stored in checkpoints, let a restarted job continue them. The stage run gets
system metrics (`core.tracking.system_metrics`), its dataset as an MLflow input, sample grids as MLflow images (a
step slider per grid) and links to the models it builds on. Models go to ``model/<name>/<UTC time>/`` of the stage
run (unique per call, an MLflow model with a python_function flavor) and become the next registered version.
"""
from __future__ import annotations

import atexit
import json
import logging
import posixpath
import re
import shutil
import time
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from core.tracking.config import TrackingConfig, _artifact_location, _configure_http, resolve_tracking_uri
from core.tracking.context import run_name, run_tags
from core.tracking.model_files import write_model_dir
from core.tracking.spool import _Sender, read_pending, write_pending
from core.tracking.system_metrics import SystemMetricsSampler

log = logging.getLogger("vaebm.tracking")

_PARAM_VALUE_MAX = 500  # longer values are cut (with a marker) so configs stay readable in the UI
_TAG_VALUE_MAX = 5000  # below MLflow's 8000-char tag limit
_KEY_MAX = 250  # MLflow's entity key limit
_DIGEST_MAX = 36  # MLflow's dataset digest limit
_TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
STATS_FILE = "stats.jsonl"  # every logged metric, one JSON object per log_metrics call (rank 0)


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


def image_key(path: str | Path) -> str:
    """The MLflow image key of a grid file: its name without the ``nimg-<digits>-`` prefix and the extension,
    restricted to the characters MLflow accepts in image keys."""
    stem = re.sub(r"^nimg-\d+-?", "", Path(path).stem) or Path(path).stem
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", stem)


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------------------------
# Tracker
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
        tracker.start("celeba64", "vaebm", run_id=ckpt.get("mlflow_run_id"),
                      parent_run_id=ckpt.get("mlflow_parent_run_id"), method="vaebm", dataset=cfg.dataset,
                      world_size=world_size)
        tracker.log_params(cfg_dict); tracker.log_metrics({"loss": l}, step=images_seen)
        tracker.log_images(grid_paths, step=images_seen)
        ckpt["mlflow_parent_run_id"], ckpt["mlflow_run_id"] = tracker.run_ids
        tracker.end("FINISHED"); tracker.close()

    One Tracker per run directory at a time (it owns ``<run_dir>/tracking/``).
    """

    def __init__(self, config: TrackingConfig, run_dir: str | Path, is_rank0: bool):
        self.config = config
        self.active = bool(config.enabled and is_rank0)
        self.run_dir = Path(run_dir)
        # Every metric also lands in <run dir>/stats.jsonl (rank 0, tracking on or off): a run reads without MLflow.
        self.stats_file: Path | None = self.run_dir / STATS_FILE if is_rank0 else None
        self.uri: str | None = None
        self._pipeline: str | None = None
        self._parent_key: str | None = None
        self._stage_key: str | None = None
        self._closed = False
        self._sender: _Sender | None = None
        self._system: SystemMetricsSampler | None = None
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
        replay = read_pending(self._sender.pending_file)
        if replay:
            log.info("replaying %d MLflow operations left over in %s", len(replay), self._sender.pending_file)
            self._sender.preload(replay)
        self._sender.start()
        _live_trackers.add(self)

    # -- runs ---------------------------------------------------------------------------------------------------
    def start(self, pipeline: str, stage: str, run_id: str | None = None, parent_run_id: str | None = None, *,
              method: str | None = None, dataset: Any = None,
              world_size: int | None = None) -> tuple[str | None, str | None]:
        """Open (or, given ids from a checkpoint, resume) the pipeline's parent run and the stage's nested run.

        New runs are named ``<method>-<dataset>-<short id>`` (`pipeline` / `stage` stand in when `method` and
        `dataset` are not given) and tagged with their origin (`core.tracking.context`: git commit, source, user,
        method, dataset, world size). `dataset`: a `DatasetConfig` (its shards become the stage run's dataset input,
        digest = manifest hash) or just a name. The stage run of rank 0 samples system metrics while it lasts
        (`TrackingConfig.system_metrics`).

        Calling it again for another stage of the same pipeline reuses this tracker's parent run. Returns
        ``(parent_run_id, stage_run_id)``; an id is None if the server did not create the run within
        ``request_timeout_s`` -- it is created (and everything logged meanwhile replayed into it) once the server
        answers, and `run_ids` reports it from then on.
        """
        if not self.active:
            return None, None
        self._stop_system_metrics()
        dataset_name = dataset if isinstance(dataset, str) or dataset is None else getattr(dataset, "name", None)
        tags = run_tags(method, dataset_name, world_size)
        if parent_run_id is not None or self._parent_key is None or pipeline != self._pipeline:
            self._parent_key = uuid.uuid4().hex
            self._pipeline = pipeline
            self._put({"op": "start", "key": self._parent_key, "resume_id": parent_run_id,
                       "name": run_name(method, dataset_name, self._parent_key[:8], pipeline), **self._where,
                       # resuming only the stage run: find its parent from the run itself
                       "parent_of": run_id if parent_run_id is None else None,
                       "tags": {**tags, "vaebm.pipeline": pipeline}})
        self._stage_key = uuid.uuid4().hex
        self._put({"op": "start", "key": self._stage_key, "resume_id": run_id, **self._where,
                   "name": run_name(method, dataset_name, self._stage_key[:8], stage),
                   "parent_key": self._parent_key, "tags": {**tags, "vaebm.pipeline": pipeline, "vaebm.stage": stage}})
        if dataset is not None and not isinstance(dataset, str):
            self._log_dataset_config(dataset)
        self._start_system_metrics()
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
        """Terminate the stage run (after its last system-metrics sample)."""
        self._stop_system_metrics()
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
        """Log scalar metrics at `step` on the stage run; NaN/inf are kept (MLflow stores them). They are appended to
        `stats.jsonl` in the run directory first, one JSON object per call: {"step", "time" (Unix s), "metrics"}."""
        ts = _now_ms()
        values = {}
        for k, v in _flatten(metrics).items():
            try:
                values[_key(k)] = float(v)
            except (TypeError, ValueError, RuntimeError):  # e.g. a string or a non-scalar tensor
                self._warn_once(f"metric:{k}", "metric %r is not a scalar (%r); not logged", k, type(v).__name__)
        self._append_stats(int(step), ts, values)
        if not self._ready("log_metrics"):
            return
        if values:
            self._put({"op": "metrics", "key": self._stage_key,
                       "metrics": [[k, v, ts, int(step)] for k, v in values.items()]})

    def _append_stats(self, step: int, ts_ms: int, values: dict[str, float]) -> None:
        if self.stats_file is None or not values:
            return
        line = json.dumps({"step": step, "time": ts_ms / 1000.0, "metrics": values}, allow_nan=True)
        try:
            with self.stats_file.open("a") as f:
                f.write(line + "\n")
        except OSError as err:  # a full or read-only disk never stops training
            self._warn_once("stats_file", "cannot append to %s: %s", self.stats_file, err)

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

    def log_images(self, paths: list[Path] | list[str], step: int) -> None:
        """Log image files (sample grids, chain strips) on the stage run as MLflow images at `step` (images seen),
        so the UI shows them with a step slider. The key is the file name without its ``nimg-<digits>-`` prefix and
        extension (``nimg-000000032768-t0.7.png`` -> ``t0.7``): one slider per kind of grid. The files are copied
        at call time and delivered like every other call (queued during an outage, spooled at close)."""
        if not self._ready("log_images"):
            return
        staged_dir = None
        images = []
        for path in map(Path, paths):
            try:
                staged_dir = staged_dir or self._new_stage_dir()
                dst = staged_dir / f"{len(images):04d}{path.suffix}"
                shutil.copy2(path, dst)
            except OSError as exc:
                log.warning("cannot stage image %s (%s); not logged", path, exc)
                continue
            images.append([str(dst), image_key(path)])
        if images:
            self._put({"op": "images", "key": self._stage_key, "images": images, "step": int(step),
                       "timestamp": _now_ms(), "done": 0, "staged": str(staged_dir)})

    def log_dataset(self, name: str, directory: str | Path, context: str = "training") -> None:
        """Record a shard directory as the stage run's dataset input (MLflow's Datasets), its digest the first 36
        hex digits of the manifest hash (MLflow's digest limit; the full hash is the tag vaebm.dataset.manifest_hash
        and part of the profile). A directory without a readable manifest is skipped with a warning."""
        if not self._ready("log_dataset"):
            return
        try:
            from data_pipelines.manifest import load_manifest

            directory = Path(directory).expanduser().resolve()
            manifest = load_manifest(directory)
            digest = manifest.content_hash()
        except Exception as exc:  # noqa: BLE001 -- the loader reports bad data itself; this only costs telemetry
            log.warning("dataset %s not recorded in MLflow: %s", directory, exc)
            return
        profile = {"num_samples": manifest.num_samples, "kind": manifest.kind, "image_size": manifest.image_size,
                   "channels": manifest.channels, "encoding": manifest.encoding, "manifest_hash": digest}
        self._put({"op": "input", "key": self._stage_key, "name": name, "digest": digest[:_DIGEST_MAX],
                   "source": str(directory), "profile": profile, "context": context})
        self.set_tags({"vaebm.dataset.manifest_hash": digest})

    def _log_dataset_config(self, dataset) -> None:
        try:
            from data_pipelines.loader_factory import resolve_dataset_dir

            directory = resolve_dataset_dir(dataset)  # builds a built-in set on first use, as the loader would
        except Exception as exc:  # noqa: BLE001 -- the loader raises the real error a moment later
            log.warning("dataset %s not recorded in MLflow: %s", getattr(dataset, "name", dataset), exc)
            return
        self.log_dataset(dataset.name, directory)

    def link_model(self, role: str, uri: str, run_id: str | None = None, name: str | None = None,
                   version: str | None = None) -> None:
        """Record on the stage run which logged model it builds on (e.g. role="backbone"): tags
        ``vaebm.<role>.uri / .run_id / .model_name / .model_version`` and params ``<role>_run_id``,
        ``<role>_model_name``, ``<role>_model_version``. What is not given is looked up by the sender: the run of
        a registered version, or the version a run registered."""
        if self._ready("link_model"):
            self._put({"op": "link", "key": self._stage_key, "role": _key(role), "uri": str(uri),
                       # not "run_id": that field names the run an operation is logged to
                       "linked_run_id": run_id, "name": name, "version": None if version is None else str(version)})

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
        except (OSError, TypeError, ValueError, RuntimeError, ImportError) as exc:
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
        self._stop_system_metrics()
        self._closed = True
        _live_trackers.discard(self)
        self._sender.flush(self.config.flush_timeout_s)
        unsent = self._sender.stop(join_timeout=self.config.request_timeout_s + 1.0)
        write_pending(self._sender.pending_file, unsent)

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

    def _start_system_metrics(self) -> None:
        if not self.config.system_metrics:
            return
        key = self._stage_key

        def emit(values: dict[str, float], step: int, ts: int) -> None:
            self._put({"op": "metrics", "key": key, "metrics": [[k, v, ts, step] for k, v in values.items()]})

        try:
            self._system = SystemMetricsSampler(emit, self.config.system_metrics_interval_s)
            self._system.start()
        except Exception as exc:  # noqa: BLE001 -- never fatal
            self._warn_once("system_metrics", "system metrics not logged: %s", exc)
            self._system = None

    def _stop_system_metrics(self) -> None:
        system, self._system = self._system, None
        if system is not None:
            system.stop()

    def _new_stage_dir(self) -> Path:
        d = self._staging / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d
