"""The one job behind every method: method selection, nested backbone stages on the user's data, model bundles.

The nested-stage test runs the real launchers (one rank, plain `python`) on shards built from the user's own image
folder, and shows the backbone trained inside the VAEBM run read exactly those shards.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch import ROOT, launch_env

from core.methods import METHODS, build_model, get_method
from core.methods.bundles import MODEL_KINDS
from core.tracking import read_model_dir
from core.training.config import ConfigError, compose_job
from core.training.job import inherited_overrides

SMALL_NVAE = ["nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8"]
SMALL_LOOP = ["loop.batch_size=4", "loop.global_batch=null", "loop.total_nimg=32", "loop.checkpoint_every_nimg=32",
              "loop.report_every_nimg=16",
              "loop.sample_every_nimg=32", "loop.sample_count=4", "loop.progress_bar=false", "loader.num_workers=0",
              "tracking.enabled=false"]


def test_every_method_has_a_conf_group_and_presets():
    for name, cls in METHODS.items():
        assert cls.name == name
        assert (ROOT / "conf" / "method" / f"{name}.yaml").is_file()
        assert (ROOT / "conf" / "experiment" / name / "quickstart.yaml").is_file()
        config, _, _ = compose_job([f"method={name}"])
        assert config.method == name and isinstance(config, cls.config_class)


def test_preset_groups_select_typed_sections():
    # the quickstart preset (the default experiment) sizes the energy for its 16x16 digits after the group is chosen
    config, _, _ = compose_job(["method=vaebm", "energy=celeba64", "energy.base_channels=8"])
    assert (config.energy.arch, config.energy.image_size, config.energy.base_channels) == ("celeba64", 16, 8)
    config, _, _ = compose_job(["method=vaebm", "experiment=celeba64", "energy.base_channels=8"])
    assert (config.energy.arch, config.energy.image_size, config.energy.base_channels) == ("celeba64", 64, 8)
    config, _, _ = compose_job(["method=nvae", "experiment=celebahq256"])
    assert (config.nvae.image_size, config.nvae.num_x_bits, config.dataset.num_bits) == (256, 5, 5)


def test_unknown_method_and_misplaced_keys_are_config_errors():
    with pytest.raises(ConfigError, match="unknown method 'gan'"):
        compose_job(["method=gan"])
    with pytest.raises(ConfigError, match="energy"):  # a VAEBM section does not exist in the NVAE job
        compose_job(["method=nvae", "energy.arch=cifar10"])
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        compose_job(["method=vaebm", "loop.keep_checkpoints=0"])


def test_nested_stage_inherits_job_sections_only():
    overrides = ["dataset.path=/d", "dataset=cifar10", "loop.total_nimg=64", "+loader.prefetch=2", "run.seed=3",
                 "run.dir=/r", "experiment=cifar10", "energy.base_channels=8", "optim.lr=1e-3", "backbone=x",
                 "tracking.enabled=false", "engine.precision=bf16"]
    assert inherited_overrides(overrides) == ["dataset.path=/d", "dataset=cifar10", "loop.total_nimg=64",
                                              "+loader.prefetch=2", "run.seed=3", "tracking.enabled=false",
                                              "engine.precision=bf16"]


def test_bundles_rebuild_through_one_registry(tmp_path):
    from core.methods.nvae import vae_bundle
    from core.models import MLPVAE, MLPVAEConfig

    vae = MLPVAE(MLPVAEConfig())
    model = build_model(vae_bundle(vae), vae.state_dict())
    assert model.kind == "mlp_vae" and model.vae is not None and not model.energy_based
    assert model.energy(torch.zeros(2, 2)) is None
    x = model.sample(5, torch.Generator().manual_seed(0)).images
    assert x.shape == (5, 2)
    with pytest.raises(ValueError, match="unknown model kind"):
        build_model({"kind": "gan"}, {})
    assert {"nvae", "mlp_vae", "vaebm"} <= set(MODEL_KINDS)
    assert get_method("vaebm").needs_backbone and not get_method("nvae").needs_backbone


def _own_image_folder(path: Path, n: int = 48) -> Path:
    """A folder of the user's own photos: 48 random 40x40 crops of scikit-image's sample photos."""
    from PIL import Image
    from skimage import data

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photos = [data.astronaut(), data.chelsea(), data.coffee()]
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - 40), rng.integers(0, img.shape[1] - 40)
        Image.fromarray(img[y:y + 40, x:x + 40]).save(path / f"{i:03d}.png")
    return path


def _run(script: str, args: list[str], tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args], cwd=tmp_path,
                          env=launch_env(tmp_path, None), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


@pytest.mark.integration
def test_nested_backbone_trains_on_the_runs_own_shards(tmp_path):
    shards = tmp_path / "shards"
    _run("prepare_data.py", [f"source={_own_image_folder(tmp_path / 'photos')}", f"out={shards}", "size=16"],
         tmp_path)
    data = [f"dataset.path={shards}", "dataset.name=mine"]

    # 1. the backbone alone, through the generic launcher
    _run("train.py", ["method=nvae", "experiment=quickstart", *data, *SMALL_NVAE, *SMALL_LOOP,
                      f"run.dir={tmp_path / 'nvae'}"], tmp_path)
    assert json.loads((tmp_path / "nvae" / "config.json").read_text())["dataset"]["path"] == str(shards)

    # 2. VAEBM on the same shards; its backbone is not registered, so it is trained first, nested, on those shards
    log = _run("train_vaebm.py", [*data, "backbone=models:/nvae-mine@latest", "backbone_train_if_missing=true",
                                  "backbone_overrides=[" + ",".join(f"'{o}'" for o in SMALL_NVAE) + "]",
                                  "energy.image_size=16", "energy.base_channels=8", "sampler.langevin.num_steps=2",
                                  "sampler.test_steps=2", *SMALL_LOOP, f"run.dir={tmp_path / 'vaebm'}"], tmp_path)
    assert "training it first" in log
    nested = json.loads((tmp_path / "vaebm" / "backbone" / "config.json").read_text())
    assert nested["method"] == "nvae" and nested["dataset"]["path"] == str(shards)
    assert nested["loop"]["total_nimg"] == 32 and nested["nvae"]["image_size"] == 16  # the run's overrides too
    nested_bundle, _ = read_model_dir(tmp_path / "vaebm" / "backbone" / "model")
    bundle, weights = read_model_dir(tmp_path / "vaebm" / "model")
    assert bundle["kind"] == "vaebm" and bundle["backbone"] == nested_bundle
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_evaluation_finds_the_runs_of_a_run_directory(tmp_path):
    """The training job and the evaluation job agree on one run-id file: `evaluate.py model=<run dir>` (or its
    model/ directory) nests its evaluate stage under the run's pipeline."""
    from core.evaluation.jobs import model_runs
    from core.training.checkpoint import save_run_ids

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    save_run_ids(run, "parent-id", "stage-id")
    uri = f"sqlite:///{tmp_path / 'empty.db'}"  # no such runs there: the file's ids are what is known
    for ref in (run, run / "model"):
        found = model_runs(str(ref), uri)
        assert (found["run"], found["parent"]) == ("stage-id", "parent-id")


def test_rng_streams_round_trip_through_a_pickle_free_file(tmp_path):
    """The per-rank checkpoint file holds the RNG streams as tensors and numbers, so it loads with
    weights_only=True, and restoring it replays exactly the draws that followed the save (numpy's cached Gaussian
    and Python's gauss cache included)."""
    import random

    from core import dist as vdist

    random.seed(5)
    np.random.seed(7)
    torch.manual_seed(3)
    np.random.standard_normal()
    random.gauss(0.0, 1.0)
    torch.save({"rng": vdist.rng_state()}, tmp_path / "rank0.pt")

    def draws():
        return (random.random(), random.gauss(0.0, 1.0), np.random.rand(), np.random.standard_normal(),
                torch.rand(3).tolist())

    expected = draws()
    draws()  # move every stream on
    vdist.set_rng_state(torch.load(tmp_path / "rank0.pt", weights_only=True)["rng"])
    assert draws() == expected


@pytest.mark.integration
def test_input_errors_after_start_are_one_line_exit_2_and_failed_runs(tmp_path):
    """A missing dataset (found before any rank communicates or any MLflow run starts) or a backbone that does not
    exist (found after start: its MLflow runs end FAILED): one line, exit code 2 (Kubernetes fails the Job at once),
    and a misnamed backbone is never replaced by training one."""
    from mlflow import MlflowClient

    cases = [("train_nvae.py", [f"dataset.path={tmp_path / 'nowhere'}"], "the directory does not exist; write shards there"),
             ("train_vaebm.py", ["backbone=models:/nope@latest"], "backbone_train_if_missing trains only "
                                                                     "models:/nvae-digits@<alias>")]
    for script, args, message in cases:
        run = tmp_path / script.replace(".py", "")
        proc = subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args, f"run.dir={run}"],
                              cwd=tmp_path, env=launch_env(tmp_path, None), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert not (run / "backbone").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


@pytest.mark.integration
def test_an_unreachable_registry_is_an_error_never_a_reason_to_train(tmp_path):
    """The quickstart may train its missing backbone, but only when the server answers that it does not exist: with
    the tracking server down the job fails (a retriable exit, not 2) and trains nothing."""
    from launch import free_port

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "train_vaebm.py"), f"run.dir={run}",
                           "tracking.flush_timeout_s=1"], cwd=tmp_path,
                          env=launch_env(tmp_path, f"http://127.0.0.1:{free_port()}"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode not in (0, 2), proc.stderr[-3000:]
    assert "TrackingUnavailableError" in proc.stderr and "training it first" not in proc.stderr
    assert not (run / "backbone").exists() and not (run / "model").exists()
