"""The benchmark harness (launchers/bench.py, core/evaluation/bench): a CPU smoke run of every suite on the tiny
shapes, the baseline (the official loops' arithmetic) against our paths on identical inputs, the FLOP count against
closed forms, and the NVAE training step under torch._dynamo.explain."""
from __future__ import annotations

import json
import math

import pytest
import torch

from core.evaluation.bench import BenchConfig, describe_bench, run_bench
from core.evaluation.bench.measure import count_flops, peak_tflops
from core.evaluation.bench.suites import Bench
from core.training.cli import run_job

SMOKE = ["suite=all", "preset=tiny", "nvae_preset=digits16", "steps=1", "warmup=0", "data.sizes=[32]",
         "data.formats=[png]", "data.backends=[torch]", "data.num_samples=32", "data.seconds=0.2",
         "data.warmup_batches=1", "data.workers=0", "data.batch_size=8", "data.resize=null"]
TOLERANCE = 1e-5  # fp32 rounding of two evaluation orders of the same arithmetic on these tiny models


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "report.json"
    rc = run_job(BenchConfig, "bench", [*SMOKE, f"out={out}", f"data.cache_dir={tmp / 'cache'}"], run_bench,
                 describe_bench)
    return rc, json.loads(out.read_text())


def test_smoke_report_has_every_suite_and_field(smoke):
    rc, report = smoke
    assert rc == 0
    assert report["device"].startswith("cpu") and report["peak_tflops"] == {"fp32": None, "bf16": None}
    rows = report["rows"]
    loops = {(r["suite"], r["path"]) for r in rows}
    for suite in ("stage1", "langevin", "sample"):
        assert {(suite, "ours"), (suite, "baseline")} <= loops
    assert ("data", "ours") in loops
    for r in rows:
        assert r["throughput"] > 0 and r["step_ms"] > 0
        # images/s = batch / step time; chain-steps/s = batch x steps / chain time = batch / time per Langevin step
        assert math.isclose(r["throughput"], r["batch"] * 1e3 / r["step_ms"], rel_tol=1e-9)
        assert r["pct_peak"] is None  # CPUs have no peak unless configured
        if r["suite"] == "data":
            continue
        assert r["peak_mem_bytes"] > 0 and r["gflop_per_step"] > 0
        if r["path"] == "baseline":
            assert r["ratio"] == 1.0
        else:  # ours vs baseline, measured in the same process, and agreeing on identical inputs
            base = next(b for b in rows if b["loop"] == r["loop"] and b["path"] == "baseline")
            assert r["ratio"] == pytest.approx(r["throughput"] / base["throughput"])
            assert r["agree"] < TOLERANCE, r
    chain = [r for r in rows if r["loop"].startswith("Langevin chain")]
    assert {r["unit"] for r in chain} == {"chain-steps/s"}
    # the official training chain also computes the energy net's weight gradients (its parameters() generator is
    # consumed by the optimizer, so requires_grad(..., False) freezes nothing): more counted FLOPs than ours
    flops = {r["path"]: r["gflop_per_step"] for r in chain}
    assert flops["baseline"] > flops["ours"]
    # the NVAE step is the same arithmetic on both paths: the same convolutions, the same count
    stage1 = {r["path"]: r["gflop_per_step"] for r in rows if r["suite"] == "stage1"}
    assert stage1["ours"] == pytest.approx(stage1["baseline"], rel=1e-3)


def test_smoke_table_has_the_columns(smoke):
    from core.evaluation.bench import format_table
    from core.evaluation.bench.suites import Row

    _, report = smoke
    table = format_table([Row(**r) for r in report["rows"]])
    header = table.splitlines()[0]
    for column in ("suite", "preset", "path", "batch", "throughput", "step ms", "peak mem", "GFLOP/step", "%peak",
                   "ratio vs baseline"):
        assert f" {column} |" in header
    assert len([line for line in table.splitlines() if line.startswith("|")]) == 2 + len(report["rows"])


def _bench(*overrides: str) -> Bench:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                              OmegaConf.from_dotlist(["nvae_preset=digits16", *overrides])))
    cfg.validate()
    return Bench(cfg)


def test_reference_target_matches_the_official_formula():
    """target=reference: the official potential E(clamp(x)) - log p(z) - log p(x|z) with log sigma floored at -2
    (written out in core/evaluation/bench/official.py) against core.methods.potentials' "reference" mode, over the
    chain and two training iterations with decoder-mean negatives (--use_mu_cd)."""
    import dataclasses

    bench = _bench("target=reference")
    bench.preset = dataclasses.replace(bench.preset, use_mean=True)
    assert bench.check_langevin() < TOLERANCE


def test_check_detects_a_different_step_size():
    """The agreement number can fail: a baseline chain with another step size disagrees far above tolerance."""
    from core.evaluation.bench.official import official_langevin
    from core.methods.potentials import make_vaebm_potential
    from core.sampling.langevin import LangevinConfig, run_langevin

    bench = _bench()
    bb = bench.backbone()
    energy = bench._sampling_model(bench._energy_state()).energy_net
    eps_x, eps_z = bench._official_starts(4, 0)
    ours = run_langevin(make_vaebm_potential(bb, energy), [eps_x, *eps_z],
                        LangevinConfig(num_steps=2, step_size=1e-2, noise_scale=0.0))
    same_x, same_z = official_langevin(bb, energy, eps_x, eps_z, 2, 1e-2, noise_scale=0.0, energy_param_grads=False)
    other_x, _ = official_langevin(bb, energy, eps_x, eps_z, 2, 2e-2, noise_scale=0.0, energy_param_grads=False)
    assert torch.allclose(ours.state[0], same_x, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours.state[1:], same_z))
    assert (ours.state[0] - other_x).abs().max() > 1e-3


def test_official_langevin_step_is_eq2_with_batch_times_mean_gradient():
    """One official step with E = 0 on the exact target: the drift of eps is -eta/2 * eps (vaebm.md Eq. 2 with
    the gradient of |eps|^2/2), recovered from `.mean().backward()` times the batch."""
    from core.evaluation.bench.official import official_langevin

    bench = _bench()
    bb = bench.backbone()

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)  # parameters to freeze and restore

        def forward(self, x):
            return x.flatten(1).sum(1) * 0.0

    eps_x, eps_z = bench._official_starts(3, 0)
    eta = 0.1
    new_x, new_z = official_langevin(bb, Zero(), eps_x, eps_z, 1, eta, noise_scale=0.0)
    torch.testing.assert_close(new_x, eps_x * (1 - eta / 2), rtol=1e-6, atol=1e-6)
    for a, b in zip(new_z, eps_z):
        torch.testing.assert_close(a, b * (1 - eta / 2), rtol=1e-6, atol=1e-6)


def test_flop_count_of_depthwise_conv_backward_is_closed_form():
    """A depthwise 3x3 conv, forward + backward (input and weight gradients): 3 x 2 N H W C k^2 FLOPs. torch's own
    formula counts the weight gradient `groups` times too high; ours does not."""
    n, c, h, k = 2, 32, 8, 3
    conv = torch.nn.Conv2d(c, c, k, padding=1, groups=c, bias=False)
    x = torch.randn(n, c, h, h, requires_grad=True)
    forward = 2 * n * h * h * c * k * k
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    dense = torch.nn.Conv2d(c, 2 * c, k, padding=1, bias=False)
    assert count_flops(lambda: dense(x).sum().backward()) == 3 * 2 * n * h * h * 2 * c * c * k * k


def test_peak_table_and_override():
    assert peak_tflops(torch.device("cpu"), "fp32") is None
    assert peak_tflops(torch.device("cpu"), "fp32", override=2.5) == 2.5


def test_bench_data_launcher_maps_its_old_keys(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_data", Path(__file__).parents[1] / "launchers/bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.data_overrides(["seconds=10", "backends=[torch]", "out=x.json", "steps=2"]) == [
        "suite=data", "data.seconds=10", "data.backends=[torch]", "out=x.json", "steps=2"]


def test_config_errors_are_one_line(capsys):
    assert run_job(BenchConfig, "bench", ["suite=nope"], run_bench, describe_bench) == 2
    assert "suite must be one of" in capsys.readouterr().err
    assert run_job(BenchConfig, "bench", ["preset=cifar10", "dry_run=true"], run_bench, describe_bench) == 0
    assert "sample_batch: 50" in capsys.readouterr().out  # the paper's 50 CIFAR-10 samples of 16 steps


# ------------------------------------------------------------------------------------------ torch.compile
@pytest.fixture(scope="module")
def explained():
    """torch._dynamo.explain of the NVAE method's loss path (forward, ELBO, spectral and BN penalties, metrics) on a
    one-scale, two-group NVAE at 16x16 without squeeze-excitation (tracing time grows with the number of cells and
power iterations, not with the data)."""
    from core.methods.base import MethodContext
    from core.methods.nvae import NVAEMethod, NVAEMethodConfig
    from core.models import NVAEConfig
    from core.training.config import load_preset

    torch._dynamo.reset()
    cfg = load_preset("nvae", "tiny", NVAEConfig, num_latent_scales=1, num_groups_per_scale=2,
                      num_preprocess_cells=1, num_postprocess_cells=1, num_channels_enc=8, num_channels_dec=8,
                      image_size=16, use_se=False)
    method = NVAEMethod(NVAEMethodConfig(nvae=cfg), MethodContext(torch.device("cpu"), 0, 0, total_nimg=1000))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    method.model.spectral_penalty()  # past the first call's 10x power-iteration warm-up: the steady-state step
    explanation = torch._dynamo.explain(lambda batch: method.loss(method.model, batch, 100))({"x": x})
    torch._dynamo.reset()
    return explanation


def test_nvae_step_compiles_without_graph_breaks(explained):
    """The NVAE training step (forward, ELBO, spectral and BN penalties, metrics) is one graph: no host reads (the
    spectral warm-up flag is a Python bool, refreshed on checkpoint loads), nothing dynamo cannot trace."""
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_resident_bytes_count_parameters_gradients_and_optimizer_state_once():
    from core.evaluation.bench.measure import tensor_bytes

    lin = torch.nn.Linear(3, 4)  # 12 + 4 fp32 parameters = 64 bytes
    opt = torch.optim.Adam(lin.parameters())
    assert tensor_bytes(lin, opt) == 64
    lin(torch.randn(2, 3)).sum().backward()
    assert tensor_bytes(lin, lin, opt) == 128  # + gradients; the module given twice is counted once
    opt.step()  # + exp_avg and exp_avg_sq (64 bytes each) + one fp32 step counter per parameter
    assert tensor_bytes(lin, opt) == 128 + 128 + 2 * 4
