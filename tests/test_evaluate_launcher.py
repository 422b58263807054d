"""launchers/evaluate.py end to end on a tiny NVAE + VAEBM trained by the real launchers: iwae, ood (results in a
real MLflow server, nested under the model's pipeline run), fid with stand-in Inception weights, missing weights."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from core.evaluation.jobs import EvaluateConfig
from test_evaluation_fid import _write_standin_weights

ROOT = Path(__file__).resolve().parents[1]
NVAE_ARGS = ["experiment=quickstart", "nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8",
             "dataset.size=16", "loop.batch_size=4",
             "loop.global_batch=null", "loop.total_nimg=64", "loop.checkpoint_every_nimg=64",
             "loop.report_every_nimg=32", "loop.sample_every_nimg=64", "loop.sample_count=4",
             "loop.progress_bar=false", "loader.num_workers=0"]
VAEBM_ARGS = ["dataset.size=16", "energy.image_size=16", "energy.base_channels=8", "sampler.langevin.num_steps=3",
              "sampler.test_steps=4", "loop.batch_size=4",
              "loop.global_batch=null", "loop.total_nimg=32", "loop.checkpoint_every_nimg=32",
              "loop.report_every_nimg=16", "loop.sample_every_nimg=32", "loop.sample_count=4",
              "loop.progress_bar=false", "loader.num_workers=0"]


def _env(tmp: Path) -> dict:
    env = dict(os.environ, VAEBM_DATA_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", TORCH_HOME=str(tmp / "hub"))
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(script: str, args: list[str], env: dict, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mlflow_server):
    """A tiny NVAE and VAEBM, registered in the test MLflow server (vaebm-digits)."""
    tmp = tmp_path_factory.mktemp("evaluate")
    env = _env(tmp)
    uri = f"tracking.tracking_uri={mlflow_server.uri}"
    _run("train_nvae.py", [*NVAE_ARGS, "tracking.enabled=false", f"run.dir={tmp}/nvae"], env, tmp)
    _run("train_vaebm.py", [f"backbone={tmp}/nvae", *VAEBM_ARGS, uri, f"run.dir={tmp}/vaebm"], env, tmp)
    return tmp, env, mlflow_server


FID_ARGS = ["metric=fid", "dataset=digits", "dataset.size=16", "fid_samples=8", "fid_reference_samples=16",
            "batch_size=4", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def evaluations(trained):
    """name -> finished `evaluate.py` process. Each launch is its own process as before, run two at a time (one per
    core): iwae then ood, and beside them fid then fid with the weights missing (after the reference statistics are
    cached, as before)."""
    tmp, env, server = trained
    weights = tmp / "standin_inception.pth"
    digest = _write_standin_weights(weights)
    fid = [*FID_ARGS, f"model={tmp}/vaebm", f"fid_cache_dir={tmp}/fidcache", f"out={tmp}/eval_fid"]
    launches = {
        "iwae": ["metric=iwae", f"model={tmp}/nvae", "dataset=digits", "dataset.size=16", "eval_samples=8",
                 "batch_size=4", "iwae_samples=4", "iwae_chunk=2", "tracking.enabled=false", f"out={tmp}/eval_iwae"],
        "ood": ["metric=ood", "model=models:/vaebm-digits@latest", "dataset=digits", "dataset.size=16",
                "eval_samples=8", "batch_size=4", "ood_iwae_samples=2", "iwae_chunk=2",
                "ood_sets=[noise,inverted,interpolation,faces25]", f"tracking.tracking_uri={server.uri}",
                f"out={tmp}/eval_ood"],
        "fid": [*fid, f"inception.weights_path={weights}", f"inception.expected_sha256={digest}"],
        "fid_missing": [*fid, f"inception.weights_path={tmp}/nowhere"],
    }

    def chain(names: tuple[str, ...]) -> dict[str, subprocess.CompletedProcess]:
        return {name: _run("evaluate.py", launches[name], env, tmp, check=False) for name in names}

    with ThreadPoolExecutor(2) as pool:
        done = [f.result() for f in [pool.submit(chain, ("fid", "fid_missing")), pool.submit(chain, ("iwae", "ood"))]]
    return {**done[0], **done[1]}


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"evaluate.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_iwae_of_the_backbone_on_held_out_images(trained, evaluations):
    tmp, env, _ = trained
    proc = _ok(evaluations["iwae"])
    report = json.loads((tmp / "eval_iwae" / "evaluate_iwae.json").read_text())
    row = report["rows"][0]
    assert row["images"] == 8 and row["K"] == 4 and row["model"] == "nvae"
    # bits/dim of the mean log-likelihood under the [-1, 1], 8-bit convention (core.evaluation.iwae.bits_per_dim)
    assert row["bits_per_dim"] == pytest.approx((row["nll_nats"] / row["dims"] + 4.848) / 0.6931, abs=2e-3)
    assert row["dims"] in (256, 768)  # 16x16, one or three channels
    assert "bits_per_dim" in proc.stdout
    assert (tmp / "eval_iwae" / "evaluate_iwae.md").read_text().count("|") > 10


def test_ood_of_the_registered_vaebm_lands_in_mlflow(trained, evaluations):
    from mlflow import MlflowClient

    tmp, env, server = trained
    proc = _ok(evaluations["ood"])
    report = json.loads((tmp / "eval_ood" / "evaluate_ood.json").read_text())
    sets = {r["ood_set"]: r for r in report["rows"]}
    assert set(sets) == {"noise", "inverted", "interpolation", "faces25"}
    for r in sets.values():
        assert 0.0 <= r["auroc_vae"] <= 1.0 and 0.0 <= r["auroc_vaebm"] <= 1.0
    # (no direction is asserted: a VAE trained on 64 images may well rank noise above digits, the known failure of
    # likelihood-based OOD detection that vaebm.md Table 6 measures)
    assert "auroc_vaebm" in proc.stdout

    client = MlflowClient(server.uri)
    mv = max(client.search_model_versions("name='vaebm-digits'"), key=lambda v: int(v.version))
    model_run = client.get_run(mv.run_id)
    parent = model_run.data.tags["mlflow.parentRunId"]
    evals = client.search_runs([model_run.info.experiment_id], "tags.`vaebm.stage` = 'evaluate'")
    assert len(evals) == 1
    run = evals[0]
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["vaebm.evaluated_run"] == mv.run_id
    # named and tagged like the run it evaluates (the stage tag tells them apart)
    assert re.fullmatch(r"vaebm-digits-[0-9a-f]{8}", run.info.run_name), run.info.run_name
    assert run.data.tags["vaebm.method"] == "vaebm" and run.data.tags["vaebm.dataset"] == "digits"
    assert run.data.metrics["ood/noise/auroc_vaebm"] == pytest.approx(sets["noise"]["auroc_vaebm"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"evaluate_ood.json", "evaluate_ood.md"} <= arts
    assert run.info.status == "FINISHED"


def test_fid_with_standin_weights_and_missing_weights(trained, evaluations):
    tmp, env, _ = trained
    _ok(evaluations["fid"])
    report = json.loads((tmp / "eval_fid" / "evaluate_fid.json").read_text())
    row = report["rows"][0]
    assert row["model"] == "vaebm" and row["samples"] == 8 and row["reference_images"] == 16 and row["fid"] > 0
    assert len(list((tmp / "fidcache").glob("fid_reference_*.npz"))) == 1

    missing = evaluations["fid_missing"]
    assert missing.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth" in missing.stderr


def test_paper_dataset_names_resolve_like_training(tmp_path, monkeypatch):
    """`evaluate.py dataset=lsun_church64` (the README's paper commands) finds $VAEBM_DATA/lsun_church64 as the
    training job does: the conf/dataset YAML's ${oc.env:VAEBM_DATA,data} is resolved, and the shards open."""
    from data_pipelines import LoaderConfig, PrepareConfig, build_dataset, build_loader

    build_dataset(PrepareConfig(source="digits", out=str(tmp_path / "lsun_church64"), size=16), progress=False)
    monkeypatch.setenv("VAEBM_DATA", str(tmp_path))
    dataset = EvaluateConfig(metric="iwae", dataset_ref="lsun_church64").dataset_config()
    assert dataset.path == str(tmp_path / "lsun_church64") and dataset.name == "lsun_church64"
    build_loader(dataset, LoaderConfig(batch_size=4, num_workers=0, backend="torch"), rank=0, world_size=1,
                 seed=0).close()
