"""The one training loop every job uses. Fixed step order (NVlabs/edm2 style):

    report -> samples -> checkpoint -> stop check -> step

Progress is counted in images seen by all ranks (`cur_nimg`). Every step reseeds torch/numpy/random from
(seed, rank, step), so an interrupted and resumed run draws exactly the noise an uninterrupted one draws. A step whose
loss is non-finite on any rank is skipped on all ranks (parameters, optimizer and BN statistics untouched) and
counted; too many in a row abort with a clear message.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from core import dist as vdist
from core.training.checkpoint import CheckpointManager, save_run_ids, tag_for
from core.training.config import LoopConfig
from core.training.preemption import StopRequest

log = logging.getLogger("vaebm.train")


class NonFiniteLossError(RuntimeError):
    """Raised on every rank when the loss stayed non-finite for `loop.max_nonfinite_in_row` steps."""


class DivergenceError(RuntimeError):
    """Raised on every rank when the method's health check failed for `divergence_patience` reports in a row."""


@dataclass
class LoopState:
    cur_nimg: int = 0  # images seen so far, all ranks together
    step: int = 0  # optimizer steps attempted (skipped ones included)
    skipped: int = 0  # steps skipped for a non-finite loss
    nonfinite_in_row: int = 0
    last_report: int = 0  # cur_nimg at the last report / samples / checkpoint
    last_sample: int = 0
    last_checkpoint: int = 0
    healthy_checkpoint: str | None = None  # newest checkpoint written while the health check passed
    unhealthy_reports: int = 0  # consecutive reports that failed the health check

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _crossed(cur: int, last: int, every: int) -> bool:
    return cur // every > last // every


class Reporter:
    """Accumulates per-step metrics locally and reduces them over ranks once per report (one collective)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.t0 = time.perf_counter()
        self.nimg0 = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1

    def reduce(self, cur_nimg: int) -> dict[str, float]:
        keys = sorted(self.sums)
        t = torch.tensor([self.sums[k] for k in keys] + [float(self.steps)], dtype=torch.float64, device=self.device)
        vdist.all_reduce_sum(t)
        count = max(t[-1].item(), 1.0)
        out = {k: t[i].item() / count for i, k in enumerate(keys)}
        elapsed = time.perf_counter() - self.t0
        out["perf/images_per_s"] = (cur_nimg - self.nimg0) / elapsed if elapsed > 0 else 0.0
        self.sums, self.steps, self.t0, self.nimg0 = {}, 0, time.perf_counter(), cur_nimg
        return out


def run_loop(method, engine, data: Iterator[dict[str, Any]], loop: LoopConfig, state: LoopState,
             checkpoints: CheckpointManager, shared: dict[str, Any], per_rank: dict[str, Any],
             info: vdist.DistInfo, seed: int, run_dir: Path, tracker, loader=None,
             stop_after_nimg: int | None = None, stop: StopRequest | None = None) -> tuple[LoopState, str | None]:
    """Train `method` until `loop.total_nimg` (or `stop_after_nimg` more images); returns the final state.

    `shared` / `per_rank` name the stateful objects the checkpoint stores beside the engine (the loop state among
    them). Reports go to the log and `tracker` on rank 0, with the data loader's bad-sample counters summed over
    ranks. The method's health check sees the reduced metrics (identical on every rank, so every rank decides alike);
    `method.divergence_patience` failing reports in a row stop training naming the last healthy checkpoint.
    A `stop` request (SIGTERM, SIGINT, runner gone) on any rank is agreed on by all ranks with the step's
    finiteness vote; the loop then reports, checkpoints at the current image count and returns. Returns the final
    state and the reason it stopped early (None when it reached its target).
    """
    global_batch = loop.batch_size * info.world_size
    start_nimg = state.cur_nimg
    reporter = Reporter(info.device)
    reporter.nimg0 = state.cur_nimg
    bar = None
    if info.is_rank0 and loop.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=loop.total_nimg, initial=state.cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True)
    module = engine.module
    preempted: str | None = None
    try:
        while True:
            done = preempted is not None or state.cur_nimg >= loop.total_nimg or (
                stop_after_nimg is not None and state.cur_nimg - start_nimg >= stop_after_nimg)

            # 1. report
            if state.cur_nimg > start_nimg and (done or _crossed(state.cur_nimg, state.last_report,
                                                                 loop.report_every_nimg)):
                metrics = reporter.reduce(state.cur_nimg)
                metrics["train/skipped_steps"] = float(state.skipped)  # identical on every rank
                if loader is not None:
                    metrics.update(loader_metrics(loader, info.device))
                for i, group in enumerate(engine.optimizer.param_groups):
                    metrics["train/lr" if i == 0 else f"train/lr_group{i}"] = float(group["lr"])
                metrics["progress/nimg"] = float(state.cur_nimg)
                problem = method.health(metrics)
                state.unhealthy_reports = state.unhealthy_reports + 1 if problem else 0
                metrics["train/unhealthy_reports"] = float(state.unhealthy_reports)
                if info.is_rank0:
                    line = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if not k.startswith("kl/"))
                    log.info("nimg=%d %s", state.cur_nimg, line)
                    if problem:
                        log.warning("unhealthy at nimg=%d (%d in a row): %s", state.cur_nimg,
                                    state.unhealthy_reports, problem)
                    tracker.log_metrics(metrics, step=state.cur_nimg)
                state.last_report = state.cur_nimg
                if state.unhealthy_reports >= method.divergence_patience:
                    where = (checkpoints.root / state.healthy_checkpoint) if state.healthy_checkpoint else "none yet"
                    raise DivergenceError(f"training diverged at nimg={state.cur_nimg}: {problem}. "
                                          f"Last healthy checkpoint: {where}")

            # 2. samples
            if state.cur_nimg > start_nimg and ((done and preempted is None) or _crossed(
                    state.cur_nimg, state.last_sample, loop.sample_every_nimg)):  # preempted: no time for grids
                if info.is_rank0:
                    for path in method.visuals(run_dir / "samples", state.cur_nimg):
                        tracker.log_artifact(path, "samples")
                state.last_sample = state.cur_nimg

            # 3. checkpoint
            if state.cur_nimg > state.last_checkpoint and (done or _crossed(state.cur_nimg, state.last_checkpoint,
                                                                            loop.checkpoint_every_nimg)):
                state.last_checkpoint = state.cur_nimg
                if state.unhealthy_reports == 0:
                    state.healthy_checkpoint = tag_for(state.cur_nimg)
                if info.is_rank0:  # run ids may become known only after a tracking outage ends
                    save_run_ids(run_dir, *tracker.run_ids)
                checkpoints.save(engine, state.cur_nimg, shared, per_rank)

            # 4. stop check
            if done:
                return state, preempted

            # 5. step
            batch = next(data)  # before reseeding: whatever RNG the loader consumes must not shift the step's noise
            vdist.seed_everything(seed, info.rank, state.step)
            buffers = [b.detach().clone() for b in module.buffers()]
            loss, metrics = method.loss(engine, batch, state.cur_nimg)
            # One collective per step carries both votes: a non-finite loss on any rank, a stop request on any rank.
            votes = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0,
                                  1.0 if stop is not None and stop.requested() else 0.0], device=info.device)
            nonfinite_ranks, stopping_ranks = vdist.all_reduce_sum(votes).tolist()
            finite = nonfinite_ranks == 0
            if stopping_ranks > 0:
                preempted = stop.reason or "another rank was asked to stop"
            if finite:
                engine.backward(loss)
                engine.step()
                state.nonfinite_in_row = 0
                reporter.add({"train/loss": loss.detach(), **metrics})
            else:
                # Forward passes in train mode moved BN statistics with non-finite activations: restore them.
                with torch.no_grad():
                    for b, saved in zip(module.buffers(), buffers):
                        b.copy_(saved)
                engine.zero_grad()
                state.skipped += 1
                state.nonfinite_in_row += 1
                if info.is_rank0:
                    log.warning("non-finite loss at nimg=%d: step skipped (%d in a row, %d total)",
                                state.cur_nimg, state.nonfinite_in_row, state.skipped)
                if state.nonfinite_in_row >= loop.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"loss was non-finite for {state.nonfinite_in_row} consecutive steps at nimg={state.cur_nimg}; "
                        f"the last good checkpoint is in {checkpoints.root}. Lower the learning rate or check the data.")
            state.step += 1
            state.cur_nimg += global_batch
            if bar is not None:
                bar.update(global_batch)
    finally:
        if bar is not None:
            bar.close()


def loader_metrics(loader, device: torch.device) -> dict[str, float]:
    """The data loader's bad-sample counters summed over ranks (collective)."""
    values = loader.metrics()
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    vdist.all_reduce_sum(t)
    return dict(zip(values.keys(), t.tolist()))
