"""The one training loop every job uses. Fixed step order (NVlabs/edm2 style):

    report -> samples -> [model selection] -> checkpoint -> stop check -> step

Progress is counted in images seen by all ranks (`cur_nimg`). An optimizer step takes `plan.accumulation`
forward/backward passes of `plan.micro` images per rank (`loop.global_batch` split over the ranks, see
`config.batch_plan`); every pass reseeds torch/numpy/random from (seed, rank, step, pass), so an interrupted and
resumed run draws exactly the noise an uninterrupted one draws. A step with a non-finite loss in any pass on any rank
is skipped on all ranks (parameters, optimizer and BN statistics untouched, partial gradients discarded) and counted;
too many in a row abort with a clear message.

Per-step metrics stay on the device and are summed there; they reach the host once per report (one collective), so
the hot loop synchronises with the device only for the step's finiteness/stop vote.
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
from core.training.config import BatchPlan, LoopConfig
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
    global_batch: int = 0  # images per optimizer step the run trains with (0: checkpoints from before it was kept)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _crossed(cur: int, last: int, every: int) -> bool:
    return cur // every > last // every


class Reporter:
    """Accumulates per-step metrics on the device (no host synchronisation per step) and reduces them over ranks
    once per report: one collective, one device-to-host copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.perf_counter()
        self.nimg0 = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v).detach().to(self.device, torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.steps += 1

    def reduce(self, cur_nimg: int) -> dict[str, float]:
        keys = sorted(self.sums)
        values = [self.sums[k].reshape(()) for k in keys]
        t = torch.stack(values + [torch.tensor(float(self.steps), dtype=torch.float64, device=self.device)])
        vdist.all_reduce_sum(t)
        host = t.tolist()
        count = max(host[-1], 1.0)
        out = {k: host[i] / count for i, k in enumerate(keys)}
        elapsed = time.perf_counter() - self.t0
        out["perf/images_per_s"] = (cur_nimg - self.nimg0) / elapsed if elapsed > 0 else 0.0
        self.sums, self.steps, self.t0, self.nimg0 = {}, 0, time.perf_counter(), cur_nimg
        return out


def run_loop(method, engine, data: Iterator[dict[str, Any]], loop: LoopConfig, plan: BatchPlan, state: LoopState,
             checkpoints: CheckpointManager, shared: dict[str, Any], per_rank: dict[str, Any],
             info: vdist.DistInfo, seed: int, run_dir: Path, tracker, loader=None,
             stop_after_nimg: int | None = None, stop: StopRequest | None = None,
             selection=None) -> tuple[LoopState, str | None]:
    """Train `method` until `loop.total_nimg` (or `stop_after_nimg` more images); returns the final state.

    `shared` / `per_rank` name the stateful objects the checkpoint stores beside the engine (the loop state among
    them). Reports go to the log and `tracker` on rank 0, with the data loader's bad-sample counters summed over
    ranks. The method's health check sees the reduced metrics (identical on every rank, so every rank decides alike);
    `method.divergence_patience` failing reports in a row stop training naming the last healthy checkpoint.
    A `stop` request (SIGTERM, SIGINT, runner gone) on any rank is agreed on by all ranks with the step's
    finiteness vote; the loop then reports, checkpoints at the current image count and returns. With a `selection`
    (core.training.selection.ModelSelection, also named in `shared`), the trained module is scored on held-out data
    at its interval and at the end, before the checkpoint. Returns the final state and the reason it stopped early
    (None when it reached its target).
    """
    global_batch = plan.global_batch
    start_nimg = state.cur_nimg
    reporter = Reporter(info.device)
    reporter.nimg0 = state.cur_nimg
    bar = None
    if info.is_rank0 and loop.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=loop.total_nimg, initial=state.cur_nimg, unit="img", unit_scale=True, dynamic_ncols=True)
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
                    tracker.log_images(method.visuals(run_dir / "samples", state.cur_nimg), step=state.cur_nimg)
                state.last_sample = state.cur_nimg

            # 2b. model selection (scored before the checkpoint, so a resume continues the same choice)
            # (at the interval, and at the end of training; not where a time slice or a preemption stops)
            if selection is not None and selection.due(state.cur_nimg, state.cur_nimg >= loop.total_nimg):
                value = selection.consider(engine.module, state.cur_nimg)
                if info.is_rank0:
                    log.info("selection score at nimg=%d: %.5g (best %.5g at nimg=%d)", state.cur_nimg, value,
                             selection.best.score, selection.best.step)
                    tracker.log_metrics({"selection/score": value, "selection/best_score": selection.best.score},
                                        step=state.cur_nimg)

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

            # 5. step: plan.accumulation passes, then one optimizer step
            # All passes' data first, before reseeding: whatever RNG the loader consumes must not shift the noise.
            batches = [next(data) for _ in range(plan.accumulation)]
            finite, stopping = train_step(method, engine, batches, seed, info, state.step, state.cur_nimg, reporter,
                                          stop, images_per_pass=plan.micro * info.world_size)
            if stopping is not None and preempted is None:
                preempted = stopping  # a reason some rank saw (StopRequest.agreed), the same on every rank
            if finite:
                state.nonfinite_in_row = 0
            else:
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


def train_step(method, engine, batches: list[dict[str, Any]], seed: int, info: vdist.DistInfo, step: int, nimg: int,
               reporter: Reporter, stop: StopRequest | None = None,
               images_per_pass: int = 0) -> tuple[bool, str | None]:
    """One optimizer step of `len(batches)` gradient-accumulation passes; returns (finite, the reason any rank was
    asked to stop or None).

    Each pass reseeds from (seed, rank, step, pass), computes the method's loss and votes with all ranks (one
    collective: a non-finite loss on any rank, a stop request on any rank); DeepSpeed steps the optimizer after the
    last pass (its accumulation boundary). Pass i sees `nimg + i * images_per_pass` as its image count (the images
    all ranks saw before it), so a method that derives noise from it draws new noise on every pass. All passes'
    batches are read before the first pass (the loader's RNG must not shift the step's noise), so a rank holds its
    whole share of the global batch at once. A non-finite pass skips the step on every rank: buffers (BN statistics,
    power-iteration vectors) are restored, the earlier passes' gradients discarded, and the remaining passes not
    computed (their images still count as seen, so the data cursor stays exact). The passes' metrics go to
    `reporter` when the step was taken.
    """
    module = engine.module
    buffers = [b.detach().clone() for b in module.buffers()]
    stopping, passes = None, []
    for i, batch in enumerate(batches):
        vdist.seed_everything(seed, info.rank, step, *([i] if i else []))  # pass 0: the seed of a plain step
        loss, metrics = method.loss(engine, batch, nimg + i * images_per_pass)
        stop_votes = stop.vote() if stop is not None else [0.0] * len(StopRequest.REASONS)
        votes = torch.cat([(~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1),
                           torch.tensor(stop_votes, device=loss.device)]).to(info.device)
        nonfinite_ranks, *stop_counts = vdist.all_reduce_sum(votes).tolist()  # the host's one wait per pass
        stopping = stopping or StopRequest.agreed(stop_counts)
        if nonfinite_ranks > 0:
            # Forward passes in train mode moved BN statistics with non-finite activations: restore them.
            with torch.no_grad():
                for b, saved in zip(module.buffers(), buffers):
                    b.copy_(saved)
            for m in module.modules():  # modules that mirror a buffer on the host re-read it (rare: skipped steps)
                if callable(getattr(m, "buffers_restored", None)):
                    m.buffers_restored()
            discard_gradients(engine, passes_done=i)
            return False, stopping
        engine.backward(loss)
        engine.step()  # an optimizer step at the last pass only
        passes.append({"train/loss": loss.detach(), **metrics})
    for metrics in passes:  # a skipped step reports nothing
        reporter.add(metrics)
    return True, stopping


def discard_gradients(engine, passes_done: int) -> None:
    """Forget a skipped step: the parameters' gradients, the optimizer's accumulation buffers and DeepSpeed's count
    of passes since the last optimizer step (so the next step's last pass is again its accumulation boundary)."""
    engine.zero_grad()
    zero_grad = getattr(engine.optimizer, "zero_grad", None)
    if zero_grad is not None:
        zero_grad(set_to_none=True)  # ZeRO-1 keeps accumulated gradients in `grad_accum` beside `.grad`
    engine.micro_steps -= passes_done  # each completed pass called engine.step(), which counted it


def loader_metrics(loader, device: torch.device) -> dict[str, float]:
    """The data loader's bad-sample counters summed over ranks (collective)."""
    values = loader.metrics()
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    vdist.all_reduce_sum(t)
    return dict(zip(values.keys(), t.tolist()))
