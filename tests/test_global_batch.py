"""`loop.global_batch`: the papers' global batch on any rank count, by gradient accumulation inside DeepSpeed.

The split itself is checked case by case; the accumulated step runs the loop's own `train_step` on a real DeepSpeed
engine (a world of one, in a subprocess) and is compared with a float64 full-batch gradient step computed by hand.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.training.config import BatchPlan, ConfigError, LoopConfig, batch_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("global_batch,batch_size,world,expected", [
    (None, 32, 2, (32, 1)),  # no global batch: one pass of batch_size per rank
    (64, 64, 1, (64, 1)),
    (64, 32, 1, (32, 2)),  # one rank accumulates what two ranks compute at once
    (64, 32, 2, (32, 1)),
    (64, 24, 1, (16, 4)),  # 64/24 needs 3 passes, but 3 does not divide 64: the fewest passes that divide it
    (96, 16, 4, (12, 2)),
    (7, 1, 7, (1, 1)),
])
def test_plan_splits_the_global_batch(global_batch, batch_size, world, expected):
    plan = batch_plan(LoopConfig(global_batch=global_batch, batch_size=batch_size), world)
    assert (plan.micro, plan.accumulation) == expected
    assert plan.micro <= batch_size
    assert plan.global_batch == (global_batch or batch_size * world)


def test_a_global_batch_that_the_ranks_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="not divisible by the 3 ranks"):
        batch_plan(LoopConfig(global_batch=64, batch_size=8), 3)


def test_zero2_with_accumulation_is_refused_before_training(monkeypatch):
    from core.training.config import compose_job

    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match="zero_stage=2 cannot accumulate"):
        compose_job(["method=nvae", "experiment=quickstart", "loop.global_batch=64", "loop.batch_size=32",
                     "engine.zero_stage=2"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # two ranks need no accumulation for the same global batch
    compose_job(["method=nvae", "experiment=quickstart", "loop.global_batch=64", "loop.batch_size=32",
                 "engine.zero_stage=2"])


# --- the accumulated step on a real engine -------------------------------------------------------------------------

LR = 0.1


class _Regression:
    """The smallest method the loop can drive: a mean squared error on (x, y) batches; `poison` makes one pass NaN."""

    def __init__(self):
        self.poison: set[int] = set()
        self.calls = 0
        self.nimgs: list[int] = []

    def loss(self, engine, batch, nimg):
        self.nimgs.append(nimg)
        out = engine(batch["x"])
        loss = ((out - batch["y"]) ** 2).mean()
        if self.calls in self.poison:
            loss = loss * float("nan")
        self.calls += 1
        return loss, {"train/mse": loss.detach()}


def _worker(out_path: str) -> None:
    from core import dist as vdist
    from core.optim.config import OptimConfig
    from core.training.config import EngineConfig
    from core.training.engine import build_engine
    from core.training.loop import Reporter, train_step
    from core.training.preemption import StopRequest

    info = vdist.init_distributed(60.0)
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    model = torch.nn.Linear(5, 3)
    w0 = [p.detach().clone() for p in model.parameters()]
    plan = BatchPlan(micro=4, accumulation=3, world_size=1)
    optim = OptimConfig(lr=LR, lr_min=LR, warmup_nimg=0)
    engine, _, _ = build_engine(model, torch.optim.SGD(model.parameters(), lr=LR), optim,
                                EngineConfig(gradient_clipping=0.0), plan, total_steps=10)
    method = _Regression()
    batches = [{"x": x[i:i + 4], "y": y[i:i + 4]} for i in range(0, 12, 4)]
    reporter = Reporter(info.device)
    results = {}
    method.poison = {1}  # the second pass of the first step is NaN: the whole step must leave no trace
    results["skipped"] = train_step(method, engine, batches, 0, info, 0, 0, reporter, images_per_pass=4)
    results["after_skip"] = [p.detach().clone() for p in engine.module.parameters()]
    results["after_skip_grads"] = [p.grad for p in engine.module.parameters()]
    stop = StopRequest()
    stop.reason = "SIGINT"  # as if this rank had been interrupted: the step is taken, the reason comes back
    results["done"] = train_step(method, engine, batches, 0, info, 1, 12, reporter, stop, images_per_pass=4)
    results["nimgs"] = method.nimgs
    results["after_step"] = [p.detach().clone() for p in engine.module.parameters()]
    results["global_steps"] = engine.global_steps
    results["w0"] = w0
    results["x"], results["y"] = x, y
    results["reported_steps"] = reporter.steps
    torch.save(results, out_path)


def test_accumulated_step_equals_one_full_batch_step_and_a_nan_pass_leaves_no_trace(tmp_path):
    out = tmp_path / "result.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(out, weights_only=True)

    assert r["skipped"] == (False, None)
    for p, p0 in zip(r["after_skip"], r["w0"]):
        assert torch.equal(p, p0)  # the skipped step did not move anything
    assert all(g is None for g in r["after_skip_grads"])  # and left no partial gradient behind
    assert r["done"] == (True, "SIGINT")
    assert r["global_steps"] == 1  # one optimizer step for three passes (DeepSpeed's boundary was the last pass)
    assert r["reported_steps"] == 3  # the three passes of the step taken; the skipped step reports nothing
    assert r["nimgs"] == [0, 4, 12, 16, 20]  # each pass sees the images before it: methods seeding from it vary

    # Reference in float64: plain gradient descent on the mean squared error of all 12 samples at once.
    w, b = (t.double().clone().requires_grad_(True) for t in r["w0"])
    loss = ((r["x"].double() @ w.T + b - r["y"].double()) ** 2).mean()
    gw, gb = torch.autograd.grad(loss, (w, b))
    expected = [w.detach() - LR * gw, b.detach() - LR * gb]
    for got, ref in zip(r["after_step"], expected):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-6)
    # Not vacuous: the mean of the three passes' losses without the 1/accumulation scaling moves 3x as far.
    assert (r["after_step"][0].double() - expected[0]).abs().max() < 1e-6 < (3 * LR * gw).abs().max()



def test_stop_votes_sum_to_one_agreed_reason():
    """Summed one-hot votes: the reason is one some rank saw (the first in REASONS order), None when no rank was
    asked; a reason outside REASONS is an error, never a silently dropped stop."""
    from core.training.preemption import StopRequest
    quiet, runner_gone, sigterm = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]
    assert StopRequest.agreed(quiet) is None
    assert StopRequest.agreed([a + b for a, b in zip(quiet, runner_gone)]) == "the deepspeed runner exited"
    assert StopRequest.agreed([a + b for a, b in zip(runner_gone, sigterm)]) == "SIGTERM"
    stop = StopRequest()
    stop.reason = "SIGINT"
    assert stop.vote() == [0.0, 1.0, 0.0]
    stop.reason = "SIGHUP"
    with pytest.raises(ValueError, match="SIGHUP"):
        stop.vote()


def _vote_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from core import dist as vdist
    from core.training.preemption import StopRequest

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = StopRequest()
    if rank == 1:
        stop.reason = "SIGTERM"  # only rank 1 was signalled
    counts = vdist.all_reduce_sum(torch.tensor(stop.vote())).tolist()
    torch.save({"agreed": StopRequest.agreed(counts), "counts": counts}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_agree_on_the_reason_only_one_of_them_saw(tmp_path):
    """Two gloo ranks, only rank 1 signalled: after the vote's all-reduce rank 0 stops for SIGTERM too."""
    from launch import free_port
    torch.multiprocessing.spawn(_vote_worker, args=(free_port(), str(tmp_path / "vote")), nprocs=2)
    for rank in (0, 1):
        r = torch.load(tmp_path / f"vote.{rank}", weights_only=True)
        assert r == {"agreed": "SIGTERM", "counts": [1.0, 0.0, 0.0]}, rank


if __name__ == "__main__":
    _worker(sys.argv[1])

