"""Stage-2 job end to end: real `deepspeed` launcher with 2 CPU ranks, real MLflow server, built-in shards.

Covers: dry runs of every Table 8 preset, bit-identical resume with the replay buffer in the checkpoint, the
no-argument main job (nested backbone stage, both models registered, samples written) and the sampling job.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
# A private server: the main job must find no `nvae-digits` registered (it trains its backbone first).
from mlflow_server import mlflow_server, mlflow_server_early  # noqa: F401  (pytest fixtures)
from launch import ROOT, deepspeed, finish, launch_env
from test_train_nvae import SMALL

from core.tracking import load_registered_model, read_model_dir
from core.training.cli import run_training

# A stage-2 run small enough for CI: 16x16 digits, a narrow energy net, 3 Langevin steps, a replay buffer.
SMALL2 = ["dataset.size=16", "energy.image_size=16", "energy.base_channels=8", "sampler.langevin.num_steps=3",
          "sampler.test_steps=4", "sampler.persistent=true", "buffer.capacity=64", "buffer.anneal_iterations=2",
          "loop.batch_size=4",
          "loop.global_batch=null", "loop.total_nimg=64", "loop.checkpoint_every_nimg=32", "loop.report_every_nimg=16",
          "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.progress_bar=false", "loader.num_workers=0",
          "run.dist_timeout_s=60", "tracking.enabled=false"]


@pytest.mark.parametrize("experiment, arch", [("quickstart", "cifar10"), ("cifar10", "cifar10"),
                                              ("cifar10_persistent", "cifar10"), ("celeba64", "celeba64"),
                                              ("lsun_church64", "lsun_church64"), ("celebahq256", "celebahq256")])
def test_dry_run_every_preset(experiment, arch, capsys):
    assert run_training([f"experiment={experiment}", "dry_run=true"], default_method="vaebm") == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and f"arch: {arch}" in out and "total" in out


@pytest.fixture(scope="module")
def small_backbone(tmp_path_factory) -> Path:
    """A 16x16 tiny NVAE trained for 64 images (seconds), as a run directory."""
    tmp = tmp_path_factory.mktemp("backbone")
    run = tmp / "nvae"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/train_nvae.py"), *SMALL, f"run.dir={run}",
                           "tracking.enabled=false"], cwd=tmp, env=launch_env(tmp, None), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


@pytest.mark.integration
def test_resume_with_replay_buffer_is_bit_identical(small_backbone, tmp_path):
    args = [*SMALL2, f"backbone={small_backbone}"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    finish(_deepspeed_vaebm([*args, f"run.dir={run_a}"], tmp_path))
    finish(_deepspeed_vaebm([*args, f"run.dir={run_b}", "run.stop_after_nimg=32"], tmp_path))
    assert not (run_b / "model").exists()
    assert (run_b / "checkpoints" / "nimg-000000000032" / "rank1.pt").is_file()
    buffer_state = torch.load(run_b / "checkpoints" / "nimg-000000000032" / "rank1.pt", weights_only=True)["buffer"]
    assert buffer_state  # the replay buffer shard of rank 1 is part of the checkpoint
    out = finish(_deepspeed_vaebm([*args, f"run.dir={run_b}"], tmp_path))
    assert "resuming from nimg-000000000032" in out
    bundle_a, weights_a = read_model_dir(run_a / "model")
    _, weights_b = read_model_dir(run_b / "model")
    assert bundle_a["kind"] == "vaebm" and any(k.startswith("energy.") for k in weights_a)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "resume is not bit-identical"
    assert any((run_a / "samples").glob("*-chains.png")) and any((run_a / "samples").glob("*-energies.png"))


def _deepspeed_vaebm(args: list[str], tmp_path: Path, tracking_uri: str | None = None):
    return deepspeed(args, tmp_path, tracking_uri, script="launchers/train_vaebm.py")


@pytest.mark.integration
def test_main_job_without_arguments_registers_both_models(tmp_path, mlflow_server):  # noqa: F811
    out = finish(_deepspeed_vaebm([], tmp_path, mlflow_server.uri), timeout=1500)
    assert "training it first" in out  # the backbone was not registered: nested stage 1
    run_dir = tmp_path / "runs" / "quickstart-vaebm"
    assert any((run_dir / "samples").glob("*-samples.png"))
    # stage 1 learned: the negative ELBO of the digits fell by hundreds of nats between its first report (8,192
    # images in) and its last (an untrained or non-stepping NVAE stays put)
    stats = [json.loads(line)["metrics"] for line in (run_dir / "backbone" / "stats.jsonl").read_text().splitlines()]
    nelbo = [m["train/nelbo"] for m in stats if "train/nelbo" in m]
    assert len(nelbo) >= 5 and nelbo[-1] < nelbo[0] - 200, nelbo
    nvae_bundle, _ = load_registered_model("models:/nvae-digits@latest", tracking_uri=mlflow_server.uri)
    vaebm_bundle, weights = load_registered_model("models:/vaebm-digits@latest", tracking_uri=mlflow_server.uri)
    assert nvae_bundle["kind"] == "nvae" and vaebm_bundle["kind"] == "vaebm"
    assert vaebm_bundle["backbone"]["nvae"] == nvae_bundle["nvae"]
    # the end-of-run report: backbone and VAEBM samples from the same noise, scored by the digits classifier
    report = (run_dir / "report.md").read_text()
    assert "| backbone |" in report and "| vaebm |" in report
    # ... and what the quickstart is for: stage 2 improves the backbone on both scores (higher classifier confidence,
    # lower Frechet distance), measured from the same starting noise
    assert "vaebm beats its baseline (backbone)" in out, report

    # the sampling job, from the registry
    out_dir = tmp_path / "samples"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/sample.py"), "model=models:/vaebm-digits@latest",
                           "n=6", f"out={out_dir}", "steps=4", "batch_size=4"], cwd=tmp_path,
                          env=launch_env(tmp_path, mlflow_server.uri), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in out_dir.glob("0*.png")) == [f"{i:06d}.png" for i in range(6)]
    assert (out_dir / "grid.png").is_file() and (out_dir / "chains.png").is_file()
