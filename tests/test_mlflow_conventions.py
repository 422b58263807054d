"""MLflow conventions of a real training job against a real `mlflow server`: run names, origin tags, system metrics,
sample grids as MLflow images, the dataset input, the stage-2 run's link to its backbone, and published models that
`mlflow.pyfunc.load_model` draws samples from (the same samples as our own loader).

One short VAEBM run (1 rank, plain python) whose backbone is not registered, so an NVAE stage is trained nested first;
every assertion reads that one run.
"""
from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from core.tracking import Tracker, TrackingConfig, read_model_dir
from launch import ROOT, launch_env

pytestmark = pytest.mark.integration

SMALL_NVAE = ["nvae.image_size=16", "nvae.num_channels_enc=8", "nvae.num_channels_dec=8"]
ARGS = ["dataset.size=16", "energy.image_size=16", "energy.base_channels=8", "sampler.langevin.num_steps=2",
        "sampler.test_steps=2", "loop.batch_size=4",
        "loop.global_batch=null", "loop.total_nimg=32", "loop.checkpoint_every_nimg=32",
        "loop.report_every_nimg=16", "loop.sample_every_nimg=16", "loop.sample_count=4", "loop.progress_bar=false",
        "loader.num_workers=0", "report.enabled=false", "tracking.system_metrics_interval_s=0.5",
        "backbone_overrides=[" + ",".join(f"'{o}'" for o in SMALL_NVAE) + "]"]
USER = "conventions-user"
ID = r"[0-9a-f]{8}"


class Trained:
    def __init__(self, uri: str, run_dir: Path, out: str):
        self.uri, self.run_dir, self.out = uri, run_dir, out
        self.client = MlflowClient(uri)
        ids = json.loads((run_dir / "mlflow_runs.json").read_text())
        self.parent = self.client.get_run(ids["parent"])
        self.stage = self.client.get_run(ids["stage"])
        nested = json.loads((run_dir / "backbone" / "mlflow_runs.json").read_text())
        self.nested = self.client.get_run(nested["stage"])


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory) -> Trained:
    tmp = tmp_path_factory.mktemp("conventions")
    run_dir = tmp / "vaebm"
    env = {**launch_env(tmp, mlflow_server.uri), "VAEBM_USER": USER}
    proc = subprocess.run([sys.executable, str(ROOT / "launchers/train_vaebm.py"), *ARGS, f"run.dir={run_dir}"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "training it first" in proc.stderr
    return Trained(mlflow_server.uri, run_dir, proc.stderr)


def test_run_names_are_method_dataset_and_a_short_id(trained):
    names = [trained.parent.info.run_name, trained.stage.info.run_name, trained.nested.info.run_name]
    assert re.fullmatch(f"vaebm-digits-{ID}", names[0]) and re.fullmatch(f"vaebm-digits-{ID}", names[1])
    assert re.fullmatch(f"nvae-digits-{ID}", names[2])
    assert len(set(names)) == 3
    assert trained.nested.data.tags["mlflow.parentRunId"] == trained.parent.info.run_id
    assert trained.stage.data.tags["mlflow.parentRunId"] == trained.parent.info.run_id


def test_every_run_carries_its_origin(trained):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    for run, method in ((trained.parent, "vaebm"), (trained.stage, "vaebm"), (trained.nested, "nvae")):
        tags = run.data.tags
        if head.returncode == 0:  # a git checkout (CI clones one)
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["mlflow.source.name"] == "launchers/train_vaebm.py"
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] == USER
        assert (tags["vaebm.method"], tags["vaebm.dataset"], tags["vaebm.world_size"]) == (method, "digits", "1")


def test_stage_runs_have_system_metrics(trained):
    total_mb = psutil.virtual_memory().total / 1e6
    for run in (trained.stage, trained.nested):
        history = trained.client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
        assert history, sorted(run.data.metrics)
        assert all(0 < m.value <= total_mb for m in history)
        assert [m.step for m in history] == list(range(len(history)))
        cpu = trained.client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        assert cpu and all(0 <= m.value <= 100 for m in cpu)
    assert not any(k.startswith("system/") for k in trained.parent.data.metrics)  # the stage runs only


def test_training_logs_sample_grids_as_images_with_steps(trained, tmp_path):
    from core.training import loop

    if "log_images" not in inspect.getsource(loop):
        pytest.skip("core/training/loop.py still uploads sample grids with tracker.log_artifact; once it calls "
                    "tracker.log_images(paths, step=nimg) this test checks them")
    files = [f.path for f in trained.client.list_artifacts(trained.stage.info.run_id, "images")]
    steps = sorted({int(re.search(r"\+step\+(\d+)\+", f).group(1)) for f in files if f.endswith(".png")})
    assert steps == [16, 32]  # every sample_every_nimg images
    keys = {Path(f).name.split("+step+")[0] for f in files if f.endswith(".png")}
    local = sorted(p.name for p in (trained.run_dir / "samples").glob("nimg-000000000032-*.png"))
    assert keys == {re.sub(r"^nimg-\d+-|\.png$", "", n) for n in local}


def test_log_images_keeps_step_and_content(mlflow_server, tmp_path):
    cfg = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="images", request_timeout_s=3.0,
                         retry_interval_s=0.3, system_metrics=False)
    grid = tmp_path / "nimg-000000000064-t0.7.png"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    with Tracker(cfg, tmp_path / "run", is_rank0=True) as tr:
        _, stage = tr.start("images", "stage1", method="nvae", dataset="digits")
        Image.fromarray(pixels).save(grid)
        tr.log_images([grid], step=64)
        grid.unlink()  # the staged copy is what gets uploaded
        tr.end()
        assert tr.flush(60) and tr.stats["dropped"] == 0
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(stage)
    assert re.fullmatch(f"nvae-digits-{ID}", run.info.run_name)
    assert not any(k.startswith("system/") for k in run.data.metrics)  # tracking.system_metrics=false
    (png,) = [f.path for f in client.list_artifacts(stage, "images") if f.path.endswith(".png")]
    assert Path(png).name.startswith("t0.7+step+64+")
    got = np.asarray(Image.open(client.download_artifacts(stage, png, str(tmp_path))).convert("RGB"))
    assert np.array_equal(got, pixels)


def test_dataset_input_is_the_shards_with_their_manifest_hash(trained):
    from data_pipelines import manifest_hash

    for run in (trained.stage, trained.nested):
        (inp,) = run.inputs.dataset_inputs
        source = Path(json.loads(inp.dataset.source)["uri"])
        full = manifest_hash(source)  # recomputed from the shards' manifest.json
        assert inp.dataset.name == "digits" and inp.dataset.digest == full[:36]
        assert json.loads(inp.dataset.profile)["manifest_hash"] == full
        assert run.data.tags["vaebm.dataset.manifest_hash"] == full
        assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"


def test_stage2_run_links_its_backbone(trained):
    client = trained.client
    (mv,) = client.search_model_versions("name = 'nvae-digits'")
    assert mv.run_id == trained.nested.info.run_id  # the nested stage registered it
    tags, params = trained.stage.data.tags, trained.stage.data.params
    assert tags["vaebm.backbone.run_id"] == params["backbone_run_id"] == trained.nested.info.run_id
    assert tags["vaebm.backbone.model_name"] == params["backbone_model_name"] == "nvae-digits"
    assert tags["vaebm.backbone.model_version"] == params["backbone_model_version"] == mv.version

    # Found in the registry instead: the version the alias names and its run, from the same lookup.
    from core.training.checkpoint import read_model_with_source

    _, weights, source = read_model_with_source("models:/nvae-digits@candidate", trained.uri)
    assert (source.name, source.version, source.run_id) == ("nvae-digits", mv.version, trained.nested.info.run_id)
    _, nested_weights = read_model_dir(trained.run_dir / "backbone" / "model")
    assert all(torch.equal(weights[k], nested_weights[k]) for k in nested_weights)


def test_pyfunc_samples_equal_our_loaders(trained, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    from core.evaluation.fid import to_uint8
    from core.evaluation.sampling import block_generator, load_trained_model, sample_blocks
    from core.methods import SampleOptions

    def sample_job(n: int, seed: int, steps: int | None = None) -> np.ndarray:
        """What launchers/sample.py batch_size=2 draws (its blocks and block seeds), uint8 NHWC."""
        out = [to_uint8(ours.sample(len(b), block_generator(seed, b.index, "cpu"), SampleOptions(steps=steps)).images)
               for b in sample_blocks(n, 2)]
        return torch.cat(out).permute(0, 2, 3, 1).numpy()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    model_dir = trained.run_dir / "model"
    assert (model_dir / "weights.safetensors").is_file() and not (model_dir / "weights.pt").exists()
    ours = load_trained_model(str(trained.run_dir), torch.device("cpu"), trained.uri)
    expected = sample_job(3, 7)  # two blocks: images 0-1 and 2
    config = {"device": "cpu", "batch_size": 2}
    t = time.perf_counter()
    registered = mlflow.pyfunc.load_model("models:/vaebm-digits@candidate", model_config=config)
    load_s = time.perf_counter() - t
    got = registered.predict({"n": 3, "seed": 7})
    assert got.dtype == np.uint8 and got.shape == (3, 16, 16, 1) and load_s < 30
    assert np.array_equal(got, expected)
    assert not np.array_equal(got[0], got[2])  # the second block has its own seed
    # The run directory's copy is the same MLflow model; a DataFrame asks several requests at once.
    local = mlflow.pyfunc.load_model(str(model_dir), model_config=config)
    both = local.predict(pd.DataFrame([{"n": 3, "seed": 7}, {"n": 2, "seed": 8, "steps": 0}]))
    assert both.shape == (5, 16, 16, 1) and np.array_equal(both[:3], expected)
    assert np.array_equal(both[3:], sample_job(2, 8, steps=0))  # steps=0: the backbone's samples


def test_old_weights_pt_directories_still_load(tmp_path):
    """Model directories written before safetensors (weights.pt) load with weights_only=True."""
    state = {"a": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([1, 2])}
    (tmp_path / "config.json").write_text(json.dumps({"kind": "x"}))
    torch.save(state, tmp_path / "weights.pt")
    config, got = read_model_dir(tmp_path)
    assert config == {"kind": "x"} and all(torch.equal(got[k], state[k]) for k in state)
    torch.save({"a": state["a"], "evil": object()}, tmp_path / "weights.pt")  # an arbitrary object is refused
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        read_model_dir(tmp_path)


def test_pyfunc_input_forms():
    from core.tracking.pyfunc import requests_of

    import pandas as pd

    default = {"seed": 0, "steps": None, "temperature": None}
    assert requests_of({"n": 4}) == [{**default, "n": 4}]
    assert requests_of({"n": [2, 3], "seed": np.array([5, 6]), "steps": 0}) == [
        {"n": 2, "seed": 5, "steps": 0, "temperature": None}, {"n": 3, "seed": 6, "steps": 0, "temperature": None}]
    frame = pd.DataFrame({"n": [1, 2], "temperature": [float("nan"), 0.7]})
    assert requests_of(frame) == [{**default, "n": 1}, {**default, "n": 2, "temperature": 0.7}]
    for bad, message in (({"seed": 1}, "required"), ({"n": 0}, ">= 1"), ({"n": 1, "size": 2}, "unknown"),
                         ({"n": [1, 2], "seed": [1, 2, 3]}, "lengths"), ({"n": 1, "steps": -1}, "steps")):
        with pytest.raises(ValueError, match=message):
            requests_of(bad)


def test_origin_tags_outside_a_git_checkout(tmp_path, monkeypatch):
    """Installed outside a checkout (or without git): no commit tag, and nothing fails."""
    from core.tracking import context

    monkeypatch.setattr(context, "REPO_ROOT", tmp_path)
    context.git_tags.cache_clear()
    try:
        tags = context.run_tags("nvae", "digits", 2)
    finally:
        context.git_tags.cache_clear()
    assert "mlflow.source.git.commit" not in tags and tags["vaebm.world_size"] == "2"
    monkeypatch.delenv("VAEBM_USER", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "svc-account")
    assert context.user() == "svc-account"
    monkeypatch.setenv("VAEBM_USER", "alice")
    assert context.user() == "alice"
