"""Launching jobs the way users do, for the tests: the real `deepspeed` launcher with two CPU ranks (gloo), and the
resume check every training test shares (run, cut back to the first checkpoint, resume, compare bit for bit)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.tracking import read_model_dir

ROOT = Path(__file__).resolve().parents[1]


def launch_env(tmp_path: Path, tracking_uri: str | None) -> dict[str, str]:
    """The environment of a launched job: one thread per rank, a private data cache, no inherited tracking URI."""
    env = dict(os.environ, OMP_NUM_THREADS="1", VAEBM_DATA_CACHE=str(tmp_path / "data-cache"),
               PYTHONPATH=str(ROOT), TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache/vaebm/torch_extensions"))
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed(args: list[str], tmp_path: Path, tracking_uri: str | None, script: str = "launchers/train_nvae.py",
              **kw) -> subprocess.Popen:
    """`deepspeed --num_gpus 2 <script> args...`: two CPU ranks (gloo), in its own process group."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / script), *args]
    return subprocess.Popen(cmd, cwd=tmp_path, env=launch_env(tmp_path, tracking_uri), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def tag(nimg: int) -> str:
    return f"nimg-{nimg:012d}"


@dataclass
class Resumed:
    run_a: Path  # the uninterrupted run
    run_b: Path  # the run cut back to its first checkpoint and resumed
    out_b: str  # what the resumed launch printed
    bundle: dict[str, Any]  # the published model's bundle (run A's; B's weights are identical)
    weights: dict[str, torch.Tensor]


def resume_is_bit_identical(args: list[str], tmp_path: Path, checkpoint_nimg: int, final_nimg: int,
                            script: str = "launchers/train.py", timeout: float = 300) -> Resumed:
    """Run A trains to `final_nimg` on 2 ranks with a checkpoint at `checkpoint_nimg`; run B is A's directory cut back
    to that checkpoint (what a kill right after it leaves) and resumed by the same command. Two launches instead of
    three: the checkpoint B resumes from is the one A wrote while continuing. B's published weights must equal A's
    bit for bit."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    finish(deepspeed([*args, f"run.dir={run_a}"], tmp_path, None, script=script), timeout)
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / "model")
    shutil.rmtree(run_b / "checkpoints" / tag(final_nimg))
    (run_b / "checkpoints" / "latest").write_text(tag(checkpoint_nimg))
    out = finish(deepspeed([*args, f"run.dir={run_b}"], tmp_path, None, script=script), timeout)
    assert f"resuming from {tag(checkpoint_nimg)}" in out
    bundle, weights_a = read_model_dir(run_a / "model")
    _, weights_b = read_model_dir(run_b / "model")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "resume is not bit-identical"
    return Resumed(run_a, run_b, out, bundle, weights_a)
