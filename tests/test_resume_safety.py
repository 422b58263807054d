"""A run directory cannot silently lose progress: verified resume and one job per run directory.

Real processes (the training launcher as a user runs it, one rank) on the built-in digits: checkpoints carry a
manifest; resume takes the newest checkpoint that verifies and still reproduces an uninterrupted run bit for bit; when
none verifies the job refuses with exit code 2 and touches nothing; a second job on a held run directory is turned
away naming the holder, and the lock dies with its holder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch import ROOT, launch_env

from core.tracking import read_model_dir
from core.training.checkpoint import verify_manifest, write_manifest

ARGS = ["nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8", "dataset.size=16",
        "loop.batch_size=4", "loop.global_batch=null", "loop.checkpoint_every_nimg=16", "loop.report_every_nimg=16",
        "loop.sample_every_nimg=64",
        "loop.sample_count=4", "loop.progress_bar=false", "loader.num_workers=0", "tracking.enabled=false",
        "loop.keep_checkpoints=5", "run.dist_timeout_s=60"]


def _start(tmp_path: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launchers/train_nvae.py"), *ARGS, f"run.dir={run}", *extra],
                            cwd=tmp_path, env=launch_env(tmp_path, None), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, check: bool = True) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    if check:
        assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(tmp_path: Path, run: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return _finish(_start(tmp_path, run, *extra), check)


def test_manifest_catches_a_changed_byte_of_the_same_size(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b.pt").write_bytes(b"x" * 100)
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    (tmp_path / "a.pt").write_bytes(b"0123456780")
    assert "SHA-256" in verify_manifest(tmp_path)
    (tmp_path / "a.pt").write_bytes(b"0123456789")
    (tmp_path / "sub" / "b.pt").unlink()
    assert verify_manifest(tmp_path) == "sub/b.pt is missing"
    (tmp_path / "manifest.json").write_text("{")
    assert "unreadable manifest" in verify_manifest(tmp_path)


@pytest.mark.integration
def test_resume_skips_corrupt_checkpoints_and_refuses_when_none_verifies(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    a = _start(tmp_path, run_a, "loop.total_nimg=64")
    b = _start(tmp_path, run_b, "loop.total_nimg=64", "run.stop_after_nimg=48")  # same schedule, stopped early
    try:
        _finish(a)
    finally:
        _finish(b)
    ckpts = run_b / "checkpoints"
    (ckpts / "latest").write_text("garbage\n")  # a clobbered marker
    newest = ckpts / "nimg-000000000048" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated model file
    log = _train(tmp_path, run_b, "loop.total_nimg=64").stderr
    assert "ignoring" in log and "'garbage'" in log
    assert "skipping checkpoint" in log and "nimg-000000000048: mp_rank_00_model_states.pt has 1000 bytes" in log
    assert "resuming from nimg-000000000032" in log
    _, weights_a = read_model_dir(run_a / "model")
    _, weights_b = read_model_dir(run_b / "model")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), "fallback resume is not bit-identical"

    # every checkpoint of the finished run a broken: one line, exit 2, nothing overwritten and no model published
    for rank_file in (run_a / "checkpoints").glob("nimg-*/rank0.pt"):
        rank_file.unlink()
    before = {p: p.stat().st_mtime_ns for p in (run_a / "checkpoints").rglob("*")}
    (run_a / "model").rename(run_a / "model-before")
    proc = _train(tmp_path, run_a, "loop.total_nimg=128", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no checkpoint in" in errors[0] and "rank0.pt is missing" in errors[0]
    assert {p: p.stat().st_mtime_ns for p in (run_a / "checkpoints").rglob("*")} == before
    assert not (run_a / "model").exists()


@pytest.mark.integration
def test_one_job_per_run_directory_and_the_lock_dies_with_its_holder(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "launchers/train_nvae.py"), *ARGS, f"run.dir={run}",
                              "loop.total_nimg=1000000"], cwd=tmp_path, env=launch_env(tmp_path, None),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
        t0 = time.perf_counter()
        second = _train(tmp_path, run, "loop.total_nimg=1000000", check=False)
        assert second.returncode == 2 and time.perf_counter() - t0 < 60
        assert "is in use by another job" in second.stderr and f'"pid": {first.pid}' in second.stderr
        assert first.poll() is None  # the first job is untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    holder = json.loads((run / ".lock").read_text())
    assert holder["pid"] == first.pid  # the file still names the dead holder, but the kernel released the lock
    third = _train(tmp_path, run, "loop.total_nimg=16")
    assert "resuming from" in third.stderr


class _Payload:
    """What an attacker with write access to a shared run directory would plant: unpickling it runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2])
def test_a_pickle_payload_in_any_file_a_resume_reads_is_refused(tmp_path, zero_stage):
    """Each file of the checkpoint in turn gets a payload (and a manifest rewritten to match, as an attacker would):
    the resume refuses it with one line naming the file, exit code 2, and the payload never runs. ZeRO-2 writes every
    kind of file a resume reads (model states, the optimizer partition, the rank file); stage 0's two files are the
    same kinds read through the same checkpoint engine, so CI runs this stage only (its budget)."""
    run = tmp_path / "run"
    _train(tmp_path, run, "loop.total_nimg=16", f"engine.zero_stage={zero_stage}")
    ckpt = run / "checkpoints" / "nimg-000000000016"
    files = sorted(p for p in ckpt.glob("*.pt"))
    assert {p.name for p in files} >= {"mp_rank_00_model_states.pt", "rank0.pt"}
    assert len(files) == (3 if zero_stage else 2)  # ZeRO adds the optimizer partition file
    marker = tmp_path / "payload-ran"
    for victim in files:
        original = victim.read_bytes()
        state = torch.load(victim, weights_only=False)  # the test's own fresh file, read to plant into it
        state["planted"] = _Payload(str(marker))
        torch.save(state, victim)
        write_manifest(ckpt)
        proc = _train(tmp_path, run, "loop.total_nimg=32", f"engine.zero_stage={zero_stage}", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"refusing to load {victim}" in errors[0], proc.stderr[-3000:]
        assert not marker.exists(), f"unpickling {victim.name} ran the planted code"
        victim.write_bytes(original)
        write_manifest(ckpt)
    # the control: the same files, untouched, resume (the refusals were the payloads', not the loaders')
    assert "resuming from" in _train(tmp_path, run, "loop.total_nimg=32", f"engine.zero_stage={zero_stage}").stderr
