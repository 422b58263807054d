"""core.tracking against a real `mlflow server` (and the embedded sqlite store): round trip, resume, outage
replay, persistence at close, non-rank-0 no-ops."""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from core.tracking import Tracker, TrackingConfig, load_registered_model, resolve_tracking_uri

pytestmark = pytest.mark.integration


def _cfg(server, experiment: str, **kw) -> TrackingConfig:
    # Short intervals so outages and recoveries are observed within a test's time budget; no system metrics, so
    # the queue holds exactly what a test logged (test_mlflow_conventions.py covers them).
    return TrackingConfig(tracking_uri=server.uri, experiment=experiment,
                          **{"request_timeout_s": 3.0, "retry_interval_s": 0.3, "system_metrics": False, **kw})


def _state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.weight": torch.randn(4, 3, generator=g),
        "enc.weight_t": torch.randn(3, 5, generator=g).t(),  # non-contiguous view
        "dec.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "count": torch.tensor([seed, 2, 3], dtype=torch.int64),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact_text(client: MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def test_round_trip(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    tr = Tracker(_cfg(mlflow_server, "round-trip"), tmp_path / "run", is_rank0=True)
    parent, stage = tr.start("digits", "stage1")
    assert parent and stage and parent != stage

    tr.log_params({"model": {"channels": 32, "groups": [4, 4]}, "lr": 1e-3, "note": "x" * 800})
    for step in range(5):
        tr.log_metrics({"loss": 1.0 / (step + 1), "grad_norm": math.nan if step == 2 else float(step)},
                       step=step * 100)
    sample = tmp_path / "grid.txt"
    sample.write_text("grid at 400")
    tr.log_artifact(sample, "samples")
    sample.write_text("overwritten later")  # the upload must carry the content at call time
    tr.set_tags({"dataset": "digits"})
    sd1, sd2 = _state_dict(1), _state_dict(2)
    tr.log_model("nvae-rt", {"channels": 32, "groups": [4, 4]}, sd1, alias="best",
                 extra_files={"README.txt": "digits NVAE"})
    tr.end()
    assert tr.flush(60), tr.stats
    assert tr.stats["dropped"] == 0 and tr.stats["pending"] == 0

    client = MlflowClient(uri)
    run = client.get_run(stage)
    assert run.info.status == "FINISHED" and client.get_run(parent).info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["vaebm.stage"] == "stage1" and run.data.tags["vaebm.pipeline"] == "digits"
    assert client.get_run(parent).data.tags["vaebm.pipeline"] == "digits"
    assert run.data.tags["dataset"] == "digits"
    params = run.data.params
    assert params["model.channels"] == "32" and params["model.groups"] == "[4, 4]" and params["lr"] == "0.001"
    assert len(params["note"]) == 500 and params["note"].endswith("...")
    assert _history(client, stage, "loss") == [(s * 100, 1.0 / (s + 1)) for s in range(5)]
    grad = _history(client, stage, "grad_norm")
    assert [s for s, _ in grad] == [0, 100, 200, 300, 400] and math.isnan(grad[2][1])
    assert _artifact_text(client, stage, "samples/grid.txt", tmp_path / "dl") == "grid at 400"

    cfg1, got1 = load_registered_model("models:/nvae-rt@latest", tmp_path / "m1", tracking_uri=uri)
    assert cfg1 == {"channels": 32, "groups": [4, 4]}
    _assert_same(got1, sd1)
    assert (tmp_path / "m1" / "README.txt").read_text() == "digits NVAE"

    # A second version (from a resumed stage run) moves the alias; version 1 stays loadable unchanged.
    tr2 = Tracker(_cfg(mlflow_server, "round-trip"), tmp_path / "run", is_rank0=True)
    assert tr2.start("digits", "stage1", run_id=stage, parent_run_id=parent) == (parent, stage)
    tr2.log_model("nvae-rt", {"channels": 64}, sd2, alias="best")
    assert tr2.flush(60)
    tr2.close()
    assert client.get_model_version_by_alias("nvae-rt", "best").version == "2"
    for ref in ("models:/nvae-rt@best", "models:/nvae-rt@latest", "models:/nvae-rt/2"):
        c, got = load_registered_model(ref, tracking_uri=uri)
        assert c == {"channels": 64}
        _assert_same(got, sd2)
    _assert_same(load_registered_model("models:/nvae-rt/1", tracking_uri=uri)[1], sd1)
    tr.close()
    assert not (tmp_path / "run" / "tracking" / "pending.jsonl").exists()


def test_resume_continues_same_runs(mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server, "resume")
    tr = Tracker(cfg, tmp_path / "run", is_rank0=True)
    parent, stage = tr.start("toy", "stage2")
    tr.log_metrics({"loss": 3.0}, step=10)
    tr.close()  # preempted: no end()

    # Only the stage id survived in the checkpoint: the parent is found from the run's own tag.
    tr = Tracker(cfg, tmp_path / "run", is_rank0=True)
    assert tr.start("toy", "stage2", run_id=stage) == (parent, stage)
    tr.log_metrics({"loss": 2.0}, step=20)
    tr.end("KILLED")
    assert tr.flush(60)
    tr.close()
    client = MlflowClient(mlflow_server.uri)
    assert _history(client, stage, "loss") == [(10, 3.0), (20, 2.0)]
    assert client.get_run(stage).info.status == "KILLED"
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted([parent, stage])


def test_outage_never_blocks_and_replays(mlflow_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vaebm.tracking")
    uri = mlflow_server.uri
    tr = Tracker(_cfg(mlflow_server, "outage"), tmp_path / "run", is_rank0=True)
    parent, stage = tr.start("digits", "stage1")
    for step in range(5):
        tr.log_metrics({"loss": float(step)}, step=step)
    assert tr.flush(30)

    mlflow_server.stop()
    try:
        slowest = 0.0
        for step in range(5, 30):
            t = time.perf_counter()
            tr.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
            slowest = max(slowest, time.perf_counter() - t)
        art = tmp_path / "during_outage.txt"
        art.write_text("written while the server was down")
        t = time.perf_counter()
        tr.log_artifact(art)
        slowest = max(slowest, time.perf_counter() - t)
        art.unlink()  # gone before the server returns: the staged copy is what gets uploaded
        assert slowest < 0.05, f"a logging call took {slowest * 1000:.1f} ms during the outage"

        # A new stage started during the outage has no id yet; its logging waits for the run to exist.
        tr.end_stage()
        t = time.perf_counter()
        parent2, stage2 = tr.start("digits", "stage2")
        assert time.perf_counter() - t < 1.0 and parent2 == parent and stage2 is None
        tr.log_metrics({"energy": -1.5}, step=7)
        tr.log_model("nvae-outage", {"k": 1}, _state_dict(3))

        deadline = time.monotonic() + 10
        while tr.stats["failures"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tr.stats["failures"] >= 3 and not tr.stats["connected"] and tr.stats["pending"] > 0
    finally:
        mlflow_server.start()

    assert tr.flush(60), tr.stats
    assert tr.stats["dropped"] == 0
    outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_warnings) == 1  # warned once, not once per retry

    client = MlflowClient(uri)
    assert _history(client, stage, "loss") == [(s, float(s)) for s in range(30)]
    assert [s for s, _ in _history(client, stage, "lr")] == list(range(5, 30))
    assert _artifact_text(client, stage, "during_outage.txt", tmp_path / "dl") == "written while the server was down"
    assert client.get_run(stage).info.status == "FINISHED"
    _, stage2 = tr.run_ids
    assert stage2 is not None
    run2 = client.get_run(stage2)
    assert run2.data.tags["mlflow.parentRunId"] == parent and run2.data.tags["vaebm.stage"] == "stage2"
    assert _history(client, stage2, "energy") == [(7, -1.5)]
    _assert_same(load_registered_model("models:/nvae-outage@latest", tracking_uri=uri)[1], _state_dict(3))
    tr.close()


def test_server_down_at_close_persists_and_next_tracker_replays(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    run_dir = tmp_path / "run"
    cfg = _cfg(mlflow_server, "close-down", flush_timeout_s=1.0)
    tr = Tracker(cfg, run_dir, is_rank0=True)
    parent, stage = tr.start("digits", "stage1")
    assert stage and tr.flush(30)

    mlflow_server.stop()
    try:
        for step in range(10):
            tr.log_metrics({"loss": 10.0 - step}, step=step)
        art = tmp_path / "last.txt"
        art.write_text("final samples")
        tr.log_artifact(art, "samples")
        tr.log_model("nvae-close", {"depth": 2}, _state_dict(4))
        tr.end_stage()
        tr.start("digits", "stage2")  # never created before close: its creation must be persisted too
        tr.log_params({"stage2.lr": 0.5})
        tr.end()
        t = time.perf_counter()
        tr.close()
        assert time.perf_counter() - t < cfg.flush_timeout_s + cfg.request_timeout_s + 2.0

        pending = run_dir / "tracking" / "pending.jsonl"
        ops = [json.loads(line) for line in pending.read_text().splitlines()]
        kinds = [op["op"] for op in ops]
        assert kinds.count("metrics") == 10 and {"artifact", "model", "start", "params", "end"} <= set(kinds)
        assert all(op["run_id"] == stage for op in ops if op["op"] == "metrics")
        assert all(Path(op["staged"]).exists() for op in ops if op["op"] in ("artifact", "model"))
        art.unlink()
    finally:
        mlflow_server.start()

    tr = Tracker(cfg, run_dir, is_rank0=True)  # e.g. the job restarted in the same run directory
    assert tr.flush(60), tr.stats
    tr.close()
    assert not pending.exists()

    client = MlflowClient(uri)
    assert _history(client, stage, "loss") == [(s, 10.0 - s) for s in range(10)]
    assert _artifact_text(client, stage, "samples/last.txt", tmp_path / "dl") == "final samples"
    assert client.get_run(stage).info.status == "FINISHED"
    cfg_m, sd = load_registered_model("models:/nvae-close@latest", tracking_uri=uri)
    assert cfg_m == {"depth": 2}
    _assert_same(sd, _state_dict(4))
    exp = client.get_experiment_by_name("close-down").experiment_id
    (run2,) = client.search_runs([exp], "tags.`vaebm.stage` = 'stage2'")
    assert run2.data.tags["mlflow.parentRunId"] == parent and run2.data.params == {"stage2.lr": "0.5"}
    assert run2.info.status == "FINISHED" and client.get_run(parent).info.status == "FINISHED"


def test_non_rank0_is_a_noop(mlflow_server, tmp_path):
    threads = threading.active_count()
    tr = Tracker(_cfg(mlflow_server, "rank1"), tmp_path / "run", is_rank0=False)
    assert tr.start("digits", "stage1") == (None, None)
    tr.log_params({"a": 1})
    tr.log_metrics({"loss": 1.0}, step=0)
    tr.log_artifact(tmp_path)
    tr.log_model("nvae-rank1", {}, _state_dict(0))
    tr.set_tags({"t": 1})
    tr.end()
    tr.close()
    assert threading.active_count() == threads
    assert not (tmp_path / "run").exists()
    client = MlflowClient(mlflow_server.uri)
    assert client.get_experiment_by_name("rank1") is None
    assert not client.search_registered_models("name = 'nvae-rank1'")


def test_embedded_store_when_no_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig()
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "cfg.yaml").write_text("lr: 1")
    with Tracker(cfg, "run", is_rank0=True) as tr:
        parent, stage = tr.start("toy", "stage1")
        assert parent and stage
        tr.log_metrics({"loss": 0.5}, step=3)
        tr.log_artifact("cfg.yaml")
        tr.end()
        assert tr.flush(60)
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    assert _history(client, stage, "loss") == [(3, 0.5)]
    assert client.get_run(stage).data.tags["mlflow.parentRunId"] == parent
    assert list((tmp_path / "mlruns" / "artifacts").rglob("cfg.yaml"))
