"""evaluate.py's console: a progress bar with the ETA on rank 0 for the loops of a metric, and one summary line last
(the metric, its values, how many samples, the time, the ranks), here for metric=fid (stand-in Inception weights)
and metric=recon on a tiny VAEBM model directory (tests/test_sample_job.py)."""
from __future__ import annotations

import json
import re

import pytest

from core.evaluation.fid import InceptionConfig
from core.evaluation.jobs import EvaluateConfig, evaluate
from core.tracking import TrackingConfig
from test_evaluation_fid import _write_standin_weights
from test_sample_job import write_tiny_vaebm

BAR_DONE = r"\| {n}/{n} \[\d\d:\d\d<\d\d:\d\d"  # tqdm's finished bar: n/n [elapsed<remaining]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate-progress")
    weights = tmp / "standin_inception.pth"
    return tmp, write_tiny_vaebm(tmp / "model"), weights, _write_standin_weights(weights)


def _config(tmp, model, **kw) -> EvaluateConfig:
    return EvaluateConfig(model=str(model), dataset_ref="digits", data={"size": 16}, batch_size=4,
                          tracking=TrackingConfig(enabled=False), out=str(tmp / kw.get("metric", "x")), **kw)


def test_fid_shows_both_loops_and_ends_with_its_summary(setup, monkeypatch, capsys):
    tmp, model, weights, digest = setup
    monkeypatch.setenv("VAEBM_DATA_CACHE", str(tmp / "cache"))
    report = evaluate(_config(tmp, model, metric="fid", fid_samples=10, fid_reference_samples=8,
                              fid_cache_dir=str(tmp / "fidcache"),
                              inception=InceptionConfig(weights_path=str(weights), expected_sha256=digest)), {})
    cap = capsys.readouterr()
    # 10 samples in blocks of 4 -> 3 batches; 8 reference images in batches of 4 -> 2 (cache miss: computed)
    assert re.search(r"fid: sampling \+ Inception: 100%.*" + BAR_DONE.format(n=3), cap.err), cap.err[-2000:]
    assert re.search(r"fid: reference images: 100%.*" + BAR_DONE.format(n=2), cap.err), cap.err[-2000:]
    last = cap.out.strip().splitlines()[-1]
    m = re.fullmatch(r"evaluated metric=fid \(fid=(\S+)\) on 10 samples vs 8 reference images in (\S+) s on "
                     r"1 rank\(s\)", last)
    assert m, last
    assert float(m[1]) == pytest.approx(report["rows"][0]["fid"], abs=1e-4) and report["rows"][0]["fid"] > 0
    assert float(m[2]) == pytest.approx(report["seconds"], abs=0.06)
    saved = json.loads((tmp / "fid" / "evaluate_fid.json").read_text())
    assert saved["summary"] == last


def test_recon_summary_and_no_bar_when_asked(setup, monkeypatch, capsys):
    tmp, model, _, _ = setup
    monkeypatch.setenv("VAEBM_DATA_CACHE", str(tmp / "cache"))
    report = evaluate(_config(tmp, model, metric="recon", eval_samples=8), {})
    cap = capsys.readouterr()
    assert re.search(r"recon: 100%.*" + BAR_DONE.format(n=2), cap.err), cap.err[-2000:]
    last = cap.out.strip().splitlines()[-1]
    m = re.fullmatch(r"evaluated metric=recon \(recon/mse_per_pixel=(\S+)\) on 8 images in \S+ s on 1 rank\(s\)",
                     last)
    assert m, last
    assert float(m[1]) == pytest.approx(report["metrics"]["recon/mse_per_pixel"], rel=1e-5)

    evaluate(_config(tmp, model, metric="recon", eval_samples=8, progress=False), {})
    cap = capsys.readouterr()
    assert "recon:" not in cap.err and cap.out.strip().splitlines()[-1].startswith("evaluated metric=recon (")
