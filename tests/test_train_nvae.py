"""Stage-1 job end to end: the real `deepspeed` launcher with 2 CPU ranks, a real MLflow server, real shards.

Covers: dry runs of every preset, config errors before any rank works, bit-identical resume after kill -9, the
registry round trip, and a tracking server that dies mid-run without stopping training.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from core.models import NVAE, NVAEConfig
from core.tracking import load_registered_model
from core.training.cli import run_training
from core.training.config import load_preset
from launch import ROOT, deepspeed, finish, launch_env
# A private server: the registry must hold no `nvae-digits` but this module's (its first version is "1").
from mlflow_server import mlflow_server, mlflow_server_early  # noqa: F401  (pytest fixtures)

SMALL = ["experiment=quickstart", "nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8",
         "dataset.size=16", "loop.batch_size=4",
         "loop.global_batch=null", "loop.total_nimg=64", "loop.checkpoint_every_nimg=32",
         "loop.report_every_nimg=16", "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.progress_bar=false",
         "loader.num_workers=0", "run.dist_timeout_s=60"]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    bundle, state = load_registered_model(str(run_dir / "model"))
    assert bundle["kind"] == "nvae"
    return state


@pytest.mark.parametrize("experiment, preset", [("quickstart", "digits16"), ("cifar10", "cifar10"),
                                                ("celeba64", "celeba64"), ("lsun_church64", "lsun_church64"),
                                                ("celebahq256", "celebahq256")])
def test_dry_run_every_preset(experiment, preset, capsys):
    assert run_training([f"experiment={experiment}", "dry_run=true"], default_method="nvae") == 0
    out = capsys.readouterr().out
    assert f"experiment: {experiment}" in out and "method: nvae" in out
    total = int(out.strip().splitlines()[-1].split()[-1].replace(",", ""))
    with torch.device("meta"):
        expected = sum(p.numel() for p in NVAE(load_preset("nvae", preset, NVAEConfig)).parameters())
    assert total == expected


INVALID = [
    ("loop.total_nimg=abc", "total_nimg"),
    ("loop.totl_nimg=5", "totl_nimg"),
    ("engine.precision=fp8", "engine.precision"),
    ("experiment=imagenet", "imagenet"),
    ("nvae.image_size=30", "divisible"),
]


@pytest.fixture(scope="module")
def invalid_launches(request, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """override -> (its own working directory, the launcher's process) for the selected cases: the launches (each a
    separate process, as before) run two at a time, one per core, instead of one after the other."""
    selected = {item.callspec.params["override"] for item in request.session.items
                if item.module is request.module and "invalid_launches" in item.fixturenames}
    cwds = {override: tmp_path_factory.mktemp("invalid") for override, _ in INVALID if override in selected}

    def launch(override: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launchers/train_nvae.py"), override, "--local_rank=0"],
                              cwd=cwds[override], env=launch_env(cwds[override], None), capture_output=True,
                              text=True, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(cwds, pool.map(launch, cwds)))
    return {override: (cwds[override], procs[override]) for override in cwds}


@pytest.mark.parametrize("override, message", INVALID)
def test_invalid_config_fails_with_one_line_before_ranks_work(override, message, invalid_launches):
    cwd, proc = invalid_launches[override]
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("config error:") and message in lines[0], proc.stderr
    assert not (cwd / "runs").exists()


@pytest.mark.integration
def test_two_rank_training_resume_registry_and_tracking_outage(tmp_path, mlflow_server):  # noqa: F811
    # 1. uninterrupted run to 64 images, tracked by the real server; the model lands in the registry
    run_a = tmp_path / "a"
    finish(deepspeed([*SMALL, f"run.dir={run_a}"], tmp_path, mlflow_server.uri))
    weights_a = _final_weights(run_a)
    bundle, registered = load_registered_model("models:/nvae-digits@latest", tracking_uri=mlflow_server.uri)
    assert bundle["nvae"]["image_size"] == 16
    assert registered.keys() == weights_a.keys()
    assert all(torch.equal(registered[k], weights_a[k]) for k in weights_a)
    model = NVAE(NVAEConfig(**bundle["nvae"]))
    model.load_state_dict(registered, strict=True)
    assert (run_a / "samples").is_dir() and any((run_a / "samples").glob("*.png"))
    # the finished run's version carries the `candidate` alias; rerunning the finished command registers nothing
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri, registry_uri=mlflow_server.uri)
    assert client.get_model_version_by_alias("nvae-digits", "candidate").version == "1"
    out = finish(deepspeed([*SMALL, f"run.dir={run_a}"], tmp_path, mlflow_server.uri))
    assert "training is complete" in out
    assert [v.version for v in client.search_model_versions("name='nvae-digits'")] == ["1"]

    # 2. same command, killed with SIGKILL once the first checkpoint exists, then re-run: bit-identical weights
    run_b = tmp_path / "b"
    proc = deepspeed([*SMALL, f"run.dir={run_b}"], tmp_path, None)
    deadline = time.time() + 240
    while not (run_b / "checkpoints" / "latest").exists():
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_b / "model").exists()
    out = finish(deepspeed([*SMALL, f"run.dir={run_b}"], tmp_path, None))
    assert "resuming from nimg-000000000032" in out
    weights_b = _final_weights(run_b)
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "resume is not bit-identical"

    # 3. the tracking server dies mid-run: training still finishes and writes its model
    run_c = tmp_path / "c"
    proc = deepspeed([*SMALL, f"run.dir={run_c}", "tracking.flush_timeout_s=2"], tmp_path, mlflow_server.uri)
    while not (run_c / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.time() < deadline + 240
        time.sleep(0.05)
    mlflow_server.stop()
    finish(proc)
    weights_c = _final_weights(run_c)
    assert all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    config = json.loads((run_c / "config.json").read_text())
    assert config["loop"]["total_nimg"] == 64


@pytest.mark.integration
def test_a_killed_rank_ends_the_whole_job(tmp_path):
    import psutil

    run_dir = tmp_path / "k"
    proc = deepspeed([*SMALL, f"run.dir={run_dir}", "loop.total_nimg=100000", "tracking.enabled=false"],
                      tmp_path, None)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "latest").exists():  # both ranks are past setup and training
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any("--local_rank=1" in a for a in p.cmdline())]
    assert len(workers) == 1
    workers[0].kill()
    proc.communicate(timeout=120)  # raises TimeoutExpired if the surviving rank hangs
    assert proc.returncode != 0
