"""What a job checks before it trains (core/training/preflight.py): data that does not fit the model fails the dry
run and the job in seconds with one line (exit 2), a missing dataset is named, and the dry run prints the batch
split, the step count and a time estimate from the measured figures in docs/benchmarks.md."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from core.training.config import compose_job
from core.training.preflight import check_data, measured_throughput, plan_lines
from data_pipelines.config import PrepareConfig
from data_pipelines.errors import DataConfigError, ManifestError
from data_pipelines.shard_writer import build_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards32(tmp_path_factory) -> Path:
    """32x32 grayscale shards from random images: the wrong size for the 16x16 quickstart NVAE."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", rng.integers(0, 256, size=(40, 32, 32), dtype=np.uint8))
    build_dataset(PrepareConfig(source=str(root / "images.npy"), out=str(root / "s32")), progress=False)
    return root / "s32"


def _compose(*overrides: str):
    return compose_job(["method=nvae", "experiment=quickstart", *overrides])[0]


def test_data_that_does_not_fit_the_model_is_refused_with_both_sizes(shards32):
    with pytest.raises(DataConfigError, match=r"gives 32x32 images \(stored\).*nvae.image_size=16"):
        check_data(_compose(f"dataset.path={shards32}"))
    # resized at load time to the model's side, the same shards fit
    fits = check_data(_compose(f"dataset.path={shards32}", "dataset.resolution=16"))
    assert (fits.num_samples, fits.stored_size, fits.side) == (40, 32, 16)


def test_points_and_images_are_refused_by_a_model_that_reads_the_other(shards32, tmp_path):
    """The MLP VAE (method nvae arch=mlp) and the MLP energy read point data of their dimension; image models read
    images. Each mismatch is one line before anything starts."""
    with pytest.raises(DataConfigError, match=f"{shards32} holds image, but method nvae reads 2-D points"):
        check_data(compose_job(["method=nvae", "experiment=ll2d", f"dataset.path={shards32}"])[0])
    rng = np.random.default_rng(1)
    np.save(tmp_path / "pts3.npy", rng.normal(size=(500, 3)).astype(np.float32))
    build_dataset(PrepareConfig(source=str(tmp_path / "pts3.npy"), out=str(tmp_path / "p3")), progress=False)
    with pytest.raises(DataConfigError, match="holds 3-D points, but method vaebm reads 2-D points"):
        check_data(compose_job(["method=vaebm", "experiment=ll2d", f"dataset.path={tmp_path / 'p3'}"])[0])
    with pytest.raises(DataConfigError, match="holds points, but method nvae reads images"):
        check_data(_compose(f"dataset.path={tmp_path / 'p3'}"))
    ok = check_data(compose_job(["method=nvae", "experiment=ll2d", f"dataset.path={tmp_path / 'p3'}",
                                 "mlp.data_dim=3"])[0])
    assert (ok.kind, ok.num_samples) == ("points", 500)


def test_a_missing_dataset_names_the_path_and_the_command_that_writes_it(tmp_path):
    with pytest.raises(ManifestError, match="does not exist; write shards there with `python launchers/prepare_data"):
        check_data(_compose(f"dataset.path={tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="it has no manifest.json"):
        check_data(_compose(f"dataset.path={tmp_path / 'empty'}"))


def test_plan_lines_show_the_split_and_a_scaled_estimate(tmp_path):
    bench = tmp_path / "benchmarks.md"
    bench.write_text("text\n```throughput\n- {method: nvae, experiment: quickstart, device: cpu, ranks: 1, "
                     "images_per_s: 200, date: 2026-12-01}\n```\n")
    figure = measured_throughput("nvae", "quickstart", "cpu", 2, source=bench)
    assert figure["images_per_s"] == 400 and figure["scaled"]
    assert measured_throughput("nvae", "quickstart", "cuda", 1, source=bench) is None
    lines = plan_lines(_compose("loop.global_batch=64", "loop.batch_size=16"), 2, "cpu")
    assert "64 images per optimizer step = 2 rank(s) x 2 pass(es) x 16 images" in lines[1]
    assert lines[2] == "training: 61440 images = 960 optimizer steps"


def test_dry_run_and_job_fail_in_seconds_with_one_line(shards32, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", VAEBM_DATA_CACHE=str(tmp_path / "cache"))

    def launch(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "launchers/train_nvae.py"), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc, time.perf_counter() - t0

    # Three separate launcher processes as before, two at a time (one per core); each is timed on its own.
    launches = [[f"dataset.path={shards32}", "dry_run=true"],
                [f"dataset.path={shards32}", f"run.dir={tmp_path / 'run'}", "tracking.enabled=false"],
                ["dry_run=true"]]
    with ThreadPoolExecutor(2) as pool:
        *refused, (ok, _) = pool.map(launch, launches)
    for proc, seconds in refused:
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the data does not fit the model" in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert seconds < 120
    assert not (tmp_path / "run" / "config.json").exists()  # nothing started
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "global batch: 64 images per optimizer step = 1 rank(s) x 1 pass(es) x 64 images" in ok.stdout
    assert "training: 61440 images = 960 optimizer steps" in ok.stdout
