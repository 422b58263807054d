"""Atomic, implicit-resume checkpoints around `engine.save_checkpoint` (DESIGN.md "Resume is implicit").

Layout under <run_dir>/checkpoints/:
    nimg-000000640/         one complete checkpoint (DeepSpeed files + rank<r>.pt per rank + manifest.json)
    latest                  the tag of the newest complete checkpoint (a hint: resume checks the directories)
    .partial-nimg-.../      a checkpoint being written; never read, removed on the next save

A checkpoint becomes visible only by a rename after every rank has finished writing, and `latest` is replaced
atomically, so a job killed at any instant resumes from the last complete checkpoint. Each published checkpoint
carries a manifest (every file's size and SHA-256); resume takes the newest checkpoint that verifies, warns naming
each one it skips, and refuses to start from zero while checkpoints exist that do not verify. The run directory must
be on a filesystem every rank sees (a shared volume on multi-node jobs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from core import dist as vdist

log = logging.getLogger("vaebm.checkpoint")
LATEST = "latest"
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """Checkpoints exist in the run directory but none can be resumed from (nothing is overwritten)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """manifest.json listing every file below `directory` with its size and SHA-256."""
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    _write_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True))


def verify_manifest(directory: Path) -> str | None:
    """None when every file of the manifest is there with its size and SHA-256, else what is wrong."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json"
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest.json ({err})"
    for rel, want in files.items():
        path = directory / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(path) != want["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


def tag_for(cur_nimg: int) -> str:
    return f"nimg-{cur_nimg:012d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RNGStreams:
    """This rank's torch / numpy / Python random streams as a named checkpoint entry."""

    def state_dict(self) -> dict[str, Any]:
        return vdist.rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vdist.set_rng_state(state)


class CheckpointManager:
    """Saves and restores the engine plus named stateful objects (edm2's CheckpointIO idea): `shared` objects are
    identical on every rank and stored once, in the engine's client state; `per_rank` objects (RNG streams, a replay
    buffer shard) are stored per rank in rank<r>.pt."""

    def __init__(self, run_dir: Path, keep: int, rank: int, world_size: int):
        self.root = run_dir / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def select(self) -> str | None:
        """Collective: the tag of the newest checkpoint that verifies against its manifest (decided on rank 0), or
        None when the run directory has none. Raises CheckpointError when checkpoints exist but none verifies."""
        choice = self._select() if self.rank == 0 else None
        choice = vdist.broadcast_object(choice)
        if isinstance(choice, dict):
            raise CheckpointError(choice["error"])
        return choice

    def _select(self) -> str | dict | None:
        tags = sorted((p.name for p in self.root.glob("nimg-*") if p.is_dir()), reverse=True)
        marker = self.root / LATEST
        if marker.is_file() and marker.read_text().strip() not in tags:
            log.warning("ignoring %s: it names no checkpoint (%r); resuming from the newest one that verifies",
                        marker, marker.read_text().strip()[:80])
        skipped = []
        for tag in tags:
            problem = verify_manifest(self.root / tag)
            if problem is None:
                return tag
            log.warning("skipping checkpoint %s: %s", self.root / tag, problem)
            skipped.append(f"{tag} ({problem})")
        if skipped:
            return {"error": f"no checkpoint in {self.root} verifies: {'; '.join(skipped)}. Nothing was "
                             "overwritten; restore a checkpoint or use another run.dir"}
        return None

    def save(self, engine, cur_nimg: int, shared: dict[str, Any], per_rank: dict[str, Any]) -> Path:
        """Collective: every rank calls it with the same names."""
        tag = tag_for(cur_nimg)
        partial = self.root / f".partial-{tag}"
        if self.rank == 0:
            for stale in self.root.glob(".partial-*"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        vdist.barrier()
        client_state = {name: obj.state_dict() for name, obj in shared.items()}
        engine.save_checkpoint(str(partial), tag=tag, client_state=client_state, save_latest=False)
        torch.save({name: obj.state_dict() for name, obj in per_rank.items()}, partial / tag / f"rank{self.rank}.pt")
        vdist.barrier()  # every rank's files are on disk before the checkpoint is published
        final = self.root / tag
        if self.rank == 0:
            write_manifest(partial / tag)
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial / tag, final)
            _write_atomic(self.root / LATEST, tag)
            shutil.rmtree(partial, ignore_errors=True)
            self._prune()
        vdist.barrier()
        return final

    def load(self, engine, tag: str, shared: dict[str, Any], per_rank: dict[str, Any]) -> None:
        """Restore checkpoint `tag` (from `select`) into `engine` and the named objects. A per-rank file that is
        missing (a resume with another world size) leaves those objects as they are, with a warning: per-step
        reseeding keeps runs reproducible per rank count."""
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"checkpoint {self.root / tag} could not be loaded")
        for name, obj in shared.items():
            if name in client_state:
                obj.load_state_dict(client_state[name])
        rank_file = self.root / tag / f"rank{self.rank}.pt"
        if rank_file.is_file():
            try:
                rank_state = torch.load(rank_file, weights_only=True)  # tensors, numbers, strings, lists only
            except pickle.UnpicklingError as err:
                raise CheckpointError(f"refusing to load {rank_file}: it holds objects other than tensors and plain "
                                      f"data ({str(err).splitlines()[-1].strip()[:200]})") from None
            for name, obj in per_rank.items():
                if name in rank_state:
                    obj.load_state_dict(rank_state[name])
        else:
            log.warning("no %s (resumed with a different world size?): per-step reseeding keeps runs reproducible "
                        "per rank count", rank_file.name)

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.root.glob("nimg-*") if p.is_dir())
        for old in tags[: max(len(tags) - self.keep, 0)]:
            shutil.rmtree(self.root / old, ignore_errors=True)


RUN_IDS = "mlflow_runs.json"  # the MLflow runs of a run directory (read by the evaluation job too)


def save_run_ids(run_dir: Path, parent: str | None, stage: str | None) -> None:
    """Rank 0: remember the MLflow runs of this run directory, so a resumed job keeps logging into them."""
    _write_atomic(run_dir / RUN_IDS, json.dumps({"parent": parent, "stage": stage}))


def load_run_ids(run_dir: Path) -> dict[str, str | None]:
    path = run_dir / RUN_IDS
    return json.loads(path.read_text()) if path.is_file() else {}


CANDIDATE_ALIAS = "candidate"  # every finished run's version; `champion` is the alias a user moves on purpose


def publish_model(tracker, run_dir: Path, name: str, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
    """Rank 0 when a stage has reached its configured length: the model in `<run_dir>/model` (so `<run dir>` works
    as a reference without MLflow), registered in MLflow as a new version of `name` with the alias `candidate`
    (`latest` is MLflow's newest version), and the resolved config logged. Both copies are MLflow models
    (core.tracking.model_files): `mlflow.pyfunc.load_model` works on `<run_dir>/model` and on
    `models:/<name>@candidate` alike."""
    from core.tracking import write_model_dir

    write_model_dir(run_dir / "model", bundle, weights)
    tracker.log_model(name, bundle, weights, alias=CANDIDATE_ALIAS)
    tracker.log_artifact(run_dir / "config.json")


def read_model(reference: str, tracking_uri: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(bundle, weights) of a published model: an MLflow model URI (`models:/<name>@<alias>`, `runs:/...`), a run
    directory (its `model/`) or a model directory (weights.safetensors, or weights.pt of older directories)."""
    bundle, weights, _ = read_model_with_source(reference, tracking_uri, resolve_source=False)
    return bundle, weights


def read_model_with_source(reference: str, tracking_uri: str | None = None, resolve_source: bool = True):
    """`read_model` plus where the model was logged (`core.tracking.ModelSource`): for a registered model the version
    the reference resolved to and its run; for a run directory (or its model/) the stage run in mlflow_runs.json,
    whose registered version the tracker looks up when it links the model."""
    from core.tracking import ModelSource, load_model_with_source

    path = Path(reference).expanduser()
    if "://" in reference or ":/" in reference:
        return load_model_with_source(reference, tracking_uri=tracking_uri, resolve_source=resolve_source)
    if (path / "model").is_dir():
        path = path / "model"
    bundle, weights, _ = load_model_with_source(str(path), tracking_uri=tracking_uri)
    run_dir = path.parent if path.name == "model" else path
    return bundle, weights, ModelSource(reference, run_id=load_run_ids(run_dir).get("stage"))


@contextlib.contextmanager
def stage_lifecycle(tracker, loaders: list) -> Iterator[None]:
    """Around a stage's training loop, on every rank: an exception (a crash, divergence) ends the MLflow runs as FAILED
    (a graceful preemption as KILLED, after which the ranks wait for each other's tracker to close) and re-raises;
    either way the tracker (its background logger) and the data loaders (their workers; the list may grow inside the
    body) are closed. The body ends the runs as FINISHED itself once the stage is complete (a time-sliced invocation
    that stops early leaves them open for the next one)."""
    from core.training.preemption import Preempted

    try:
        yield
    except Preempted:
        tracker.end("KILLED")  # preempted after its checkpoint: the next invocation continues these runs
        # Rank 0 flushes (or spools to disk) its telemetry before any rank exits: DeepSpeed's launcher kills the
        # other ranks as soon as one exits non-zero, and a rank that finished first would cut rank 0's close short.
        tracker.close()
        vdist.barrier()
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    finally:
        tracker.close()
        for loader in loaders:
            loader.close()
