"""The one training job every method runs on (DESIGN.md "Seams"):

    run directory -> tracker -> [frozen backbone] -> method -> engine -> restore -> loader -> loop -> publish

`train(config, resolved, overrides)` is the whole job for `method=<name>`. The method builds its networks and
computes its loss; this module owns ranks, the DeepSpeed engine, checkpoints, MLflow and the data. A method that
needs a frozen backbone gets it from the registry or a run directory; with `backbone_train_if_missing=true` a missing
one is trained first, as a nested MLflow stage, on the same dataset and with the same job-level overrides.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from core import dist as vdist
from core.methods import MethodContext, build_model, get_method
from core.tracking import ModelNotFoundError, Tracker, resolve_tracking_uri
from core.training import preflight
from core.training.checkpoint import (CheckpointManager, RNGStreams, load_run_ids, publish_model, read_model,
                                      save_run_ids, stage_lifecycle, tag_for)
from core.training.config import ConfigError, JobConfig, batch_plan, compose_job
from core.training.engine import build_engine
from core.training.lock import RunDirLock, RunDirLocked
from core.training.loop import LoopState, run_loop
from core.training.preemption import Preempted, StopRequest
from core.training.selection import ModelSelection
from data_pipelines.errors import ManifestError
from data_pipelines.loader_factory import build_loader

RUN_LOG = "log.txt"  # rank 0's log lines, appended across resumes
SELECTION_FILE = "selection.json"  # a run with model selection: which weights were published and every score
log = logging.getLogger("vaebm.train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Job-level sections a nested backbone stage inherits from the command line (the method's own sections belong to
# the other method; `backbone_overrides` carries those).
_INHERITED_SECTIONS = ("dataset", "loader", "loop", "engine", "tracking", "run")


class BackboneNotFound(LookupError):
    """The backbone reference names no loadable model (not registered yet, or a directory without one)."""


def model_name(config: JobConfig) -> str:
    """Registered model name: `<method prefix>-<dataset>` (e.g. nvae-digits, vaebm-cifar10)."""
    return f"{get_method(config.method).model_prefix}-{config.dataset.name}"


def describe(config: JobConfig, resolved: dict[str, Any]) -> str:
    """Dry-run text: the resolved config, the data check (manifest found, images fit the model), the batch split
    over the ranks with the step count and time estimate, and parameter counts (built on the meta device: no
    memory, any preset). Data that does not fit the model raises DataConfigError; data not found is reported."""
    import yaml

    from core.models.summary import format_summary

    text = yaml.safe_dump(resolved, sort_keys=False)
    try:
        note = preflight.check_data(config).note  # data that does not fit the model raises: exit 2
    except ManifestError as err:  # absent here (e.g. a dry run away from the cluster's volume): said, not fatal
        note = f"NOT FOUND: training would stop with: {err}"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    text += "\ndata: " + note + "\n" + "\n".join(preflight.plan_lines(config, world_size, device)) + "\n"
    with torch.device("meta"):
        for title, module in get_method(config.method).describe(config):
            text += f"\n{title} parameters per module:\n" + format_summary(module)
    return text


def load_backbone(reference: str, tracking_uri: str | None, device: torch.device, dtype: torch.dtype,
                  tracker: Tracker | None = None):
    """(frozen noise-space VAE, its bundle) from an MLflow model URI, a run directory or a model directory. With a
    `tracker`, its stage run records which run and registered version the backbone is (`Tracker.link_model`)."""
    from core.training.checkpoint import read_model_with_source

    try:
        # The registered version's run is looked up by the tracker's sender, off the training path: a slow or failing
        # lookup on rank 0 alone must never stall the other ranks at their next collective.
        bundle, weights, source = read_model_with_source(reference, tracking_uri, resolve_source=False)
    except ModelNotFoundError as err:  # the server (or the disk) says it does not exist; unreachable is an error
        raise BackboneNotFound(f"no backbone at {reference}: {err}") from err
    model = build_model(bundle, weights, device)
    if model.vae is None:
        raise BackboneNotFound(f"{reference} is a {bundle.get('kind')!r} model, not a noise-space VAE backbone")
    if tracker is not None:
        tracker.link_model("backbone", reference, run_id=source.run_id, name=source.name, version=source.version)
    return model.to(device, dtype).vae, bundle


def inherited_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides of job-level sections that a nested backbone stage must see too."""
    out = []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        root = key.split(".", 1)[0]
        if root in _INHERITED_SECTIONS and key != "run.dir":
            out.append(o)
    return out


def _ensure_backbone(config, info: vdist.DistInfo, tracker: Tracker, run_dir: Path, overrides: list[str]):
    uri = resolve_tracking_uri(config.tracking)
    dtype = DTYPES[config.backbone_dtype]
    try:
        return load_backbone(config.backbone, uri, info.device, dtype, tracker)
    except BackboneNotFound as err:
        if not config.backbone_train_if_missing:
            raise
        # Only the model the nested stage would register may be trained in its place: a typo'd name or a missing
        # directory is an error, never a reason to train (and register) something else.
        own = f"models:/{get_method(config.backbone_method).model_prefix}-{config.dataset.name}"
        if not (config.backbone == own or config.backbone.startswith((own + "@", own + "/"))):
            raise BackboneNotFound(f"{err}; backbone_train_if_missing trains only {own}@<alias>, the backbone this "
                                   "run would register") from None
    if info.is_rank0:
        log.info("backbone %s is not registered: training it first (method=%s experiment=%s)", config.backbone,
                 config.backbone_method, config.backbone_experiment)
    nested, nested_resolved, nested_overrides = compose_job(
        [f"method={config.backbone_method}", f"experiment={config.backbone_experiment}",
         *inherited_overrides(overrides), *config.backbone_overrides, f"run.dir={run_dir / 'backbone'}"])
    # The same data as this run, whatever the backbone's preset says (its own checks still apply), at the backbone's
    # own bit depth (CelebA-HQ-256: NVAE trains on 5 bits, VAEBM's energy sees 8).
    nested.dataset = dataclasses.replace(config.dataset, num_bits=nested.dataset.num_bits)
    nested_resolved["dataset"] = dataclasses.asdict(nested.dataset)
    nested.tracking = config.tracking
    nested.validate()
    backbone_dir = train(nested, nested_resolved, nested_overrides, parent_run_id=tracker.run_ids[0])
    vdist.barrier()
    return load_backbone(str(backbone_dir), uri, info.device, dtype, tracker)


def final_report(config: JobConfig, bundle: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
                 tracker: Tracker, run_dir: Path, nimg: int) -> list[dict[str, Any]] | None:
    """Rank 0, end of training: the trained model's samples against its baseline's from the same noise
    (core/evaluation/baseline.py), printed as a two-row table, written to <run_dir>/report.md and logged."""
    from core.evaluation import baseline as cmp
    from core.evaluation.jobs import markdown_table

    rc = config.report
    model = build_model(bundle, weights, device)
    if not rc.enabled or model.baseline is None:
        return None
    if not cmp.applies(config.dataset.name):
        vae = getattr(model, "vae", None)
        metric = "ll2d" if vae is not None and len(vae.x_shape()) == 1 else f"fid model={run_dir}"  # points: 2-D
        log.info("end-of-run report: no download-free score for dataset %r; compare with `launchers/evaluate.py "
                 "metric=%s`", config.dataset.name, metric)
        return None
    t = time.perf_counter()
    rows = cmp.compare_with_baseline(model, cmp.digits_scorer(rc.scorer_cache_dir), rc.num_samples, rc.batch_size,
                                     rc.seed, rc.steps, device)
    text = (f"## {model.kind} against its baseline ({rc.num_samples} samples each, same starting noise; digits "
            f"classifier score)\n\n{markdown_table(rows)}\n\n{cmp.verdict(rows)}\n")
    (run_dir / "report.md").write_text(text)
    print(text, flush=True)
    tracker.log_metrics(cmp.metrics_of(rows), step=nimg)
    tracker.log_artifact(run_dir / "report.md")
    log.info("end-of-run report took %.1f s", time.perf_counter() - t)
    return rows


def train(config: JobConfig, resolved: dict[str, Any], overrides: list[str] | None = None,
          parent_run_id: str | None = None, selection: ModelSelection | None = None) -> Path:
    """Run (or resume) the job of `config.method`; returns the run directory. `overrides` are the command-line
    overrides (a nested backbone stage inherits the job-level ones); `parent_run_id` nests it in a pipeline run.
    `selection`: score the trained module on held-out data during training and publish its best-scoring weights
    (core.training.selection; the 2-D likelihood protocol selects its energy this way); the choice is written to
    <run dir>/selection.json."""
    overrides = list(overrides or [])
    method_cls = get_method(config.method)
    run_dir = config.run_dir()
    preflight.check_data(config)  # before any collective: every rank fails alike, in seconds, with one line
    info = vdist.init_distributed(config.run.dist_timeout_s)
    lock = RunDirLock(run_dir)
    refusal = None
    if info.is_rank0:
        try:
            lock.acquire()
        except RunDirLocked as err:
            refusal = str(err)
    refusal = vdist.broadcast_object(refusal)  # every rank of a turned-away job exits, none waits on a barrier
    if refusal is not None:
        raise RunDirLocked(refusal)
    handler = _run_log(run_dir) if info.is_rank0 else None
    try:
        return _train_locked(config, resolved, overrides, parent_run_id, method_cls, run_dir, info, selection)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        lock.release()


def _publish_selection(selection: ModelSelection, module: torch.nn.Module, run_dir: Path, tracker: Tracker,
                       info: vdist.DistInfo) -> None:
    """End of training with model selection: the best-scoring weights replace the last ones before export."""
    restored = selection.best.restore(module)
    if info.is_rank0:
        summary = selection.summary()
        (run_dir / SELECTION_FILE).write_text(json.dumps(summary, indent=1))
        tracker.log_artifact(run_dir / SELECTION_FILE)
        tracker.set_tags({"selection.best_nimg": str(selection.best.step)})
        if restored:
            log.info("model selection: publishing the weights of nimg=%d (score %.5g; %d scores)",
                     selection.best.step, selection.best.score, len(selection.best.history))
        else:
            log.warning("model selection: no finite score during training; publishing the last weights")


def _run_log(run_dir: Path) -> logging.Handler:
    """Rank 0's log lines also go to <run dir>/log.txt (appended across resumes), so a run reads without MLflow;
    its metrics are in stats.jsonl (core.tracking.Tracker)."""
    handler = logging.FileHandler(run_dir / RUN_LOG, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    return handler


def _train_locked(config: JobConfig, resolved: dict[str, Any], overrides: list[str], parent_run_id: str | None,
                  method_cls, run_dir: Path, info: vdist.DistInfo, selection: ModelSelection | None = None) -> Path:
    if info.is_rank0:
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, sort_keys=True))
    vdist.barrier()

    loop_cfg = config.loop
    checkpoints = CheckpointManager(run_dir, loop_cfg.keep_checkpoints, info.rank, info.world_size)
    tag = checkpoints.select()  # the newest checkpoint that verifies; an error if checkpoints exist but none does
    resuming = tag is not None
    ids = load_run_ids(run_dir) if resuming and info.is_rank0 else {}
    tracker = Tracker(config.tracking, run_dir, info.is_rank0)
    tracker.start(pipeline=config.experiment, stage=config.method, run_id=ids.get("stage"),
                  parent_run_id=ids.get("parent") or parent_run_id, method=config.method, dataset=config.dataset,
                  world_size=info.world_size)
    plan = batch_plan(loop_cfg, info.world_size)
    if info.is_rank0:
        log.info("batch: %d images per optimizer step = %d ranks x %d pass(es) x %d images", plan.global_batch,
                 plan.world_size, plan.accumulation, plan.micro)
    loader_cfg = dataclasses.replace(config.loader, batch_size=plan.micro,
                                     device="cuda" if info.device.type == "cuda" else "cpu")
    loaders: list[Any] = []
    with stage_lifecycle(tracker, loaders):
        backbone, backbone_bundle = (_ensure_backbone(config, info, tracker, run_dir, overrides)
                                     if method_cls.needs_backbone else (None, None))
        ctx = MethodContext(device=info.device, seed=config.run.seed, rank=info.rank,
                            total_nimg=loop_cfg.total_nimg, sample_count=loop_cfg.sample_count,
                            sample_temperatures=list(loop_cfg.sample_temperatures), reduce_sum=vdist.all_reduce_sum)
        method = method_cls(config, ctx, backbone, backbone_bundle)
        module = method.trained_module()
        if config.engine.sync_batchnorm and info.device.type == "cuda" and info.world_size > 1:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)

        first_loader = build_loader(config.dataset, loader_cfg, rank=info.rank, world_size=info.world_size,
                                    seed=config.run.seed, cur_nimg=0)
        loaders.append(first_loader)
        method.setup(next(iter(first_loader)), fresh=not resuming)
        first_loader.close()
        loaders.remove(first_loader)

        total_steps = -(-loop_cfg.total_nimg // plan.global_batch)
        optimizer = method.make_optimizer(method.param_groups())
        engine, _, _ = build_engine(module, optimizer, config.optim, config.engine, plan, total_steps)

        state = LoopState()
        shared = {"loop": state, **method.shared_state(), **({"selection": selection} if selection else {})}
        per_rank = {"rng": RNGStreams(), **method.rank_state()}
        if resuming:
            checkpoints.load(engine, tag, shared, per_rank)
            if info.is_rank0:
                log.info("resuming from %s at nimg=%d", tag, state.cur_nimg)
            if state.global_batch not in (0, plan.global_batch):  # the same on every rank: all refuse alike
                raise ConfigError(f"{run_dir} was trained with {state.global_batch} images per optimizer step; this "
                                  f"command asks for {plan.global_batch} (loop.global_batch, or batch_size x ranks). "
                                  f"Continue it with loop.global_batch={state.global_batch}, or start a new run.dir")
        else:
            tracker.log_params(resolved)
        state.global_batch = plan.global_batch

        if state.cur_nimg >= loop_cfg.total_nimg and (run_dir / "model" / "MLmodel").is_file():  # finished before
            if info.is_rank0:
                log.info("training is complete (nimg=%d of %d): nothing to do; the model is in %s", state.cur_nimg,
                         loop_cfg.total_nimg, run_dir / "model")
            tracker.end("FINISHED")
            return run_dir
        loader = build_loader(config.dataset, loader_cfg, rank=info.rank, world_size=info.world_size,
                              seed=config.run.seed, cur_nimg=state.cur_nimg)
        loaders.append(loader)
        stop = StopRequest().install()
        try:
            state, preempted = run_loop(method, engine, iter(loader), loop_cfg, plan, state, checkpoints, shared,
                                        per_rank, info, config.run.seed, run_dir, tracker, loader=loader,
                                        stop_after_nimg=config.run.stop_after_nimg, stop=stop, selection=selection)
        finally:
            stop.restore()
        if preempted is not None:
            if info.is_rank0:
                log.warning("stopped at nimg=%d (%s): checkpoint %s written; the same command resumes", state.cur_nimg,
                            preempted, checkpoints.root / tag_for(state.last_checkpoint))
            raise Preempted(preempted)
        finished = state.cur_nimg >= loop_cfg.total_nimg
        if finished and selection is not None:
            _publish_selection(selection, engine.module, run_dir, tracker, info)
        if finished and info.is_rank0:
            bundle, weights = method.export()
            publish_model(tracker, run_dir, model_name(config), bundle, weights)
            save_run_ids(run_dir, *tracker.run_ids)
            final_report(config, bundle, weights, info.device, tracker, run_dir, state.cur_nimg)
        if finished:
            tracker.end("FINISHED")  # a time-sliced invocation leaves its runs open for the next one
    return run_dir
