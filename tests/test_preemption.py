"""Graceful preemption with real processes: SIGTERM reaches every rank, the job checkpoints where it is, exits with a
retriable code, and the same command resumes bit-identically to a run that was never interrupted.

Two ways the signal reaches the ranks: through our Kubernetes launch script (k8s/base/launch-deepspeed.sh, which
sends it to the runner's whole session), and with only DeepSpeed's runner killed (`kill <runner pid>`), where each
rank notices that its runner is gone.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from launch import ROOT, deepspeed, finish, free_port, launch_env
from test_train_nvae import _final_weights

from core.training.checkpoint import verify_manifest

# 2 CPU ranks x 4 images: long enough to be interrupted mid-run, a periodic checkpoint every 160 images.
ARGS = ["experiment=quickstart", "nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8",
        "dataset.size=16", "loop.batch_size=4",
        "loop.global_batch=null", "loop.total_nimg=640", "loop.checkpoint_every_nimg=160",
        "loop.report_every_nimg=80", "loop.sample_every_nimg=640", "loop.sample_count=4", "loop.progress_bar=false",
        "loader.num_workers=0", "run.dist_timeout_s=60", "tracking.enabled=false"]
GRACE_S = 30  # Kubernetes' default terminationGracePeriodSeconds


def _ranks(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if any(a.startswith("--local_rank=") for a in p.cmdline())]


def _wait_for_training(run: Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + 240
    while not (run / "checkpoints" / "latest").exists():  # past setup, the first periodic checkpoint is written
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)


def _preempt(tmp_path: Path, run: Path, proc: subprocess.Popen, target: int, reason: str, reference) -> None:
    """Signal `target` mid-run; every rank stops within the grace period with a checkpoint where it was, and rank 0
    names `reason` (the ranks agree on it even when one of them noticed a step earlier); with a `reference` (the
    uninterrupted run's weights) the same command then resumes to exactly those weights."""
    _wait_for_training(run, proc)
    ranks = _ranks(psutil.Process(proc.pid))
    assert len(ranks) == 2
    t0 = time.perf_counter()
    os.kill(target, signal.SIGTERM)
    _, alive = psutil.wait_procs(ranks, timeout=GRACE_S)
    assert not alive, "a rank outlived the grace period"
    assert time.perf_counter() - t0 < GRACE_S
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not (run / "model").exists()
    stopped = re.search(rf"stopped at nimg=(\d+) \({reason}\)", out)
    assert stopped, out[-4000:]
    nimg = int(stopped.group(1))
    assert nimg % 160 != 0 or nimg > 160  # not just the periodic checkpoint: where the job was
    assert (run / "checkpoints").joinpath(f"nimg-{nimg:012d}").is_dir()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"nimg-{nimg:012d}"
    ckpt = run / "checkpoints" / f"nimg-{nimg:012d}"
    assert verify_manifest(ckpt) is None  # intact
    assert {"rank0.pt", "rank1.pt", "mp_rank_00_model_states.pt"} <= {p.name for p in ckpt.iterdir()}  # every rank
    if reference is None:
        return
    resumed = finish(deepspeed([*ARGS, f"run.dir={run}"], tmp_path, None))
    assert f"resuming from nimg-{nimg:012d}" in resumed
    weights = _final_weights(run)
    assert all(torch.equal(reference[k], weights[k]) for k in reference), "resume after preemption is not exact"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    finish(deepspeed([*ARGS, f"run.dir={tmp / 'run'}"], tmp, None))
    return _final_weights(tmp / "run")


@pytest.mark.integration
def test_sigterm_to_the_launch_script_checkpoints_every_rank_and_resumes_exactly(tmp_path, uninterrupted):
    run = tmp_path / "run"
    env = dict(launch_env(tmp_path, None), VAEBM_NNODES="1", VAEBM_GPUS_PER_NODE="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.Popen(["bash", str(ROOT / "k8s/base/launch-deepspeed.sh"), "--master_port", str(free_port()),
                             str(ROOT / "launchers/train_nvae.py"), *ARGS, f"run.dir={run}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _preempt(tmp_path, run, proc, proc.pid, "SIGTERM", uninterrupted)
    assert proc.returncode == 143  # retriable for the Job (exit 2 alone fails it at once)


@pytest.mark.integration
def test_killing_only_the_deepspeed_runner_leaves_no_rank_training(tmp_path):
    """Also with the tracking server unreachable: the queued telemetry is spooled to disk on the way out. (That the
    checkpoint resumes exactly is the test above's; this one stops at the checkpoint.)"""
    run = tmp_path / "run"
    dead_server = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = deepspeed([*ARGS, f"run.dir={run}", "tracking.enabled=true", "tracking.flush_timeout_s=2"], tmp_path,
                      dead_server)  # python -m deepspeed.launcher.runner ...
    _preempt(tmp_path, run, proc, proc.pid, "the deepspeed runner exited", None)
    spool = run / "tracking" / "pending.jsonl"
    assert spool.is_file() and spool.read_text().strip(), "telemetry of the preempted run was lost"
