"""metric=ll2d on a SHORT 2-D protocol (both stages on the training job, < 60 s on 2 cores): table format, the
analytic `true` row, grid log Z vs Monte Carlo, the marginal-mixture estimator vs a direct sum and vs IWAE, the
job's validation model selection (published weights, resume), the preset's per-layer energy init, and the VAEBM
method's negative phase (SIR starts) against the exact E_h[E]."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.evaluation.density2d import Grid2D, vaebm_log_likelihood
from core.evaluation.toy2d import (Toy2DProtocol, ValidationScorer, build_context, decoder_components,
                                   format_ll2d_table, gaussians25_split, mixture_log_density, plan_stages, run_ll2d,
                                   train_vaebm)
from core.methods.base import MethodContext
from core.methods.vaebm import VAEBMConfig, VAEBMMethod
from core.models.energy import EnergyNet, EnergyNetConfig, data_dependent_init
from core.sampling.langevin import LangevinConfig
from core.evaluation.toy2d import _model
from core.training.config import compose_job
from core.training.selection import ModelSelection

ROOT = Path(__file__).resolve().parents[1]
TRUE_LL = -1.4516  # E_p[log p] of the sigma=0.1 25-Gaussians mixture (the paper's -1.10 is inconsistent with it)

# A 150-step VAE is still broad (sigma_x ~ 3): wide grid; 3000 test points give the `true` row a ~0.02 std error.
# The energy: 15 steps of 32 points with 3 Langevin steps, scored for selection every 5 steps (160 points).
VAE_SHORT = ["loop.total_nimg=38400", "loop.global_batch=256", "loop.batch_size=256"]
VAEBM_SHORT = ["loop.total_nimg=480", "loop.global_batch=32", "loop.batch_size=32", "loop.report_every_nimg=160",
               "loop.checkpoint_every_nimg=160", "sampler.langevin.num_steps=3"]
SHORT = dict(train_points=3000, test_points=3000, vae_overrides=VAE_SHORT, vaebm_overrides=VAEBM_SHORT,
             marginal_samples=4000, iwae_samples=200, iwae_points=10, grid_n=120, grid_half_width=16.0,
             mc_samples=20000, val_points=1000, select_every_nimg=160, val_marginal_samples=4000, val_grid_n=60)


@pytest.fixture(scope="module")
def short_result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ll2d-cache")
    return run_ll2d(Toy2DProtocol(**SHORT), "gaussians25", cache), cache


def test_table_true_row_and_log_partition(short_result):
    (result, info), _ = short_result
    assert list(result.rows) == ["true", "vae", "vaebm"]
    table = format_ll2d_table(result)
    lines = table.splitlines()
    assert lines[0] == "| model | test log-likelihood (nats) |"
    assert [ln.split("|")[1].strip() for ln in lines[2:5]] == ["true", "vae", "vaebm"]
    assert lines[-1] == f"gap_closed={result.gap_closed:.4f}"
    r = result.rows
    assert result.gap_closed == pytest.approx((r["vaebm"] - r["vae"]) / (r["true"] - r["vae"]))
    # the analytic row is the sigma=0.1 mixture: within 4 standard errors of its expectation
    assert abs(r["true"] - TRUE_LL) < 4 * result.true_std_error + 1e-3
    # the VAEBM is normalized: the grid integral agrees with the importance-sampling estimate
    assert abs(result.log_z_grid - result.log_z_mc) < max(5 * result.log_z_mc_stderr, 0.02)
    # the grid holds the VAE's mass (coverage check reported in the table)
    assert abs(result.extra["log_vae_mass_on_grid"]) < 0.01
    assert "grid coverage" in table
    # the kept energy is the validation-selected one, and the table says which
    assert f"energy checkpoint: nimg {result.extra['val_best_nimg']}" in table
    assert [h[0] for h in info["val_history"]] == [160, 320, 480]
    assert result.extra["val_best_log_likelihood"] == max(h[1] for h in info["val_history"])
    # the shared-prior marginal estimator of log p_vae agrees with IWAE on the cross-check points
    c = result.iwae_check
    assert abs(c["iwae"] - c["marginal"]) < 0.05
    assert all(math.isfinite(v) for v in r.values())


def test_finished_runs_are_reused_and_the_published_energy_is_the_selected_one(short_result):
    (first, info), cache = short_result
    runs = Path(info["runs"])
    weights = runs / "vaebm" / "model" / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    again, info2 = run_ll2d(Toy2DProtocol(**SHORT), "gaussians25", cache)
    assert weights.stat().st_mtime_ns == stamp  # the finished jobs did nothing
    assert info2["runs"] == info["runs"] and again.rows == first.rows
    assert again.extra["val_best_nimg"] == first.extra["val_best_nimg"]
    # the published energy scores exactly the best validation score (a fresh scorer: an independent recomputation)
    proto = Toy2DProtocol(**SHORT)
    ctx_vae = build_context(proto, "gaussians25", cache).vae
    _, val, _ = gaussians25_split(proto)
    from core.methods import build_model
    from core.training.checkpoint import read_model

    energy = build_model(*read_model(str(runs / "vaebm"), None), torch.device("cpu")).energy_net
    assert ValidationScorer(ctx_vae, val, proto).score(energy) == pytest.approx(
        first.extra["val_best_log_likelihood"], abs=1e-9)


def test_a_resumed_energy_run_selects_exactly_as_an_uninterrupted_one(short_result, tmp_path):
    """Stage 2 stopped after 240 of 480 points (a checkpoint at 160 holds the selection state, 240 is written at the
    stop) and resumed: the same scores, the same chosen weights as the uninterrupted run of `short_result`."""
    (first, info), cache = short_result
    proto = Toy2DProtocol(**SHORT)
    train, val, _ = gaussians25_split(proto)
    vae = build_context(proto, "gaussians25", cache).vae
    stages = plan_stages(proto, train, val, Path(cache), "ll2d-gaussians25")  # stage 1: short_result's finished run
    stages.vaebm[0].run.dir = str(tmp_path / "vaebm")
    stages.vaebm[0].run.stop_after_nimg = 256
    with pytest.raises(RuntimeError, match="stopped before the end of training"):  # a time slice publishes nothing
        train_vaebm(stages, vae, val, proto)
    assert not (tmp_path / "vaebm" / "model").exists()  # stopped before the end
    stages.vaebm[0].run.stop_after_nimg = None
    energy, summary = train_vaebm(stages, vae, val, proto)
    assert summary["val_history"] == info["val_history"]
    assert summary["val_best_nimg"] == first.extra["val_best_nimg"]
    from core.methods import build_model
    from core.training.checkpoint import read_model

    ref = build_model(*read_model(str(Path(info["runs"]) / "vaebm"), None), torch.device("cpu")).energy_net
    assert all(torch.equal(a, b) for a, b in zip(energy.state_dict().values(), ref.state_dict().values()))


def test_the_job_publishes_the_selected_weights_not_the_last(short_result, tmp_path):
    """A stage-2 job with a selection whose scores peak at the middle of three (1, 3, 2 at 160, 320, 480 points):
    the published energy holds the weights scored at 320 exactly, which differ from the last ones."""
    from core.evaluation.toy2d import _run_stage
    from core.training.selection import ModelSelection

    (_, _), cache = short_result
    proto = Toy2DProtocol(**SHORT)
    train, val, _ = gaussians25_split(proto)
    stages = plan_stages(proto, train, val, Path(cache), "ll2d-gaussians25")  # stage 1: short_result's finished run
    stages.vaebm[0].run.dir = str(tmp_path / "vaebm")
    scores, snapshots = iter([1.0, 3.0, 2.0]), []

    def score(module: torch.nn.Module) -> float:
        snapshots.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return next(scores)

    selection = ModelSelection(score, every_nimg=160)
    run_dir = _run_stage(stages.vaebm, None, selection=selection)
    assert [h[0] for h in selection.best.history] == [160, 320, 480] and selection.best.step == 320
    published = _model(run_dir).energy_net.state_dict()
    assert all(torch.equal(published[k], snapshots[1][k]) for k in published)
    assert not all(torch.equal(published[k], snapshots[2][k]) for k in published)
    assert json.loads((run_dir / "selection.json").read_text())["best_nimg"] == 320


def test_model_selection_is_due_at_intervals_and_the_end_and_survives_a_checkpoint(tmp_path):
    net = torch.nn.Linear(2, 1)
    values = iter([0.5, float("nan"), 2.0, 1.0])
    sel = ModelSelection(lambda m: next(values), every_nimg=100)
    assert not sel.due(64, finished=False) and sel.due(128, finished=False)
    for nimg, w in ((128, 1.0), (256, 2.0), (300, 3.0)):
        with torch.no_grad():
            net.weight.fill_(w)
        sel.consider(net, nimg)
    assert not sel.due(320, finished=False) and sel.due(320, finished=True) and not sel.due(300, finished=True)
    assert (sel.best.step, sel.best.score) == (300, 2.0)  # the NaN at 256 is never chosen
    torch.save(sel.state_dict(), tmp_path / "sel.pt")
    again = ModelSelection(lambda m: 0.0, every_nimg=100)
    again.load_state_dict(torch.load(tmp_path / "sel.pt", weights_only=True))  # plain data and tensors only
    assert repr(again.summary()) == repr(sel.summary()) and again.last_nimg == 300  # repr: nan == nan
    with torch.no_grad():
        net.weight.fill_(9.0)  # trained on after the best score
    assert again.best.restore(net)
    assert torch.equal(net.weight, torch.full((1, 2), 3.0))


def test_mixture_log_density_matches_a_direct_sum():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3000, 2, generator=g) * 2
    sigma = 0.05 + torch.rand(3000, 2, generator=g)
    x = torch.randn(400, 2, generator=g) * 2.5
    direct = torch.logsumexp(torch.distributions.Normal(mu[None].double(), sigma[None].double())
                             .log_prob(x[:, None].double()).sum(-1), dim=1) - math.log(len(mu))
    assert torch.allclose(mixture_log_density(x, mu, sigma), direct, atol=1e-4)


@pytest.mark.parametrize("override", ["run.dir=/tmp/x", "tracking.enabled=true", "dataset.path=/tmp/d",
                                      "backbone=/tmp/b", "+run.seed=3"])
def test_the_protocol_refuses_overrides_of_what_it_decides(override):
    with pytest.raises(ValueError, match="what the protocol decides"):
        Toy2DProtocol(vaebm_overrides=[override]).validate()
    Toy2DProtocol(vaebm_overrides=["loop.total_nimg=512", "sampler.init_candidates=4"]).validate()


def test_per_layer_energy_init_sets_each_layer_std():
    config, _, _ = compose_job(["method=vaebm", "experiment=ll2d", "energy.hidden=64"])
    cfg = config.energy
    assert cfg.init_scales == [8.0, 1.0, 1.0, 0.2]  # a wide first layer, 1 inside, VAEBM's 0.2 at the head
    net = EnergyNet(cfg)
    x = torch.randn(2048, 2) * 3
    data_dependent_init(net, x, init_scale=cfg.init_scale)
    pre = net.hidden_layers[0](x)
    assert pre.std(dim=0).mean().item() == pytest.approx(8.0, rel=0.05)
    assert net(x).std().item() == pytest.approx(0.2, rel=0.05)
    with pytest.raises(ValueError):
        EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=64, num_layers=3, init_scales=[1.0]))


def test_npy_points_have_no_true_row(tmp_path):
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(-1, 0.3, (1500, 2)), rng.normal(1, 0.3, (1500, 2))]).astype(np.float32)
    np.save(tmp_path / "pts.npy", pts)
    proto = Toy2DProtocol(**{**SHORT, "vae_overrides": ["loop.total_nimg=5120"], "grid_n": 60, "mc_samples": 2000,
                             "vaebm_overrides": [*VAEBM_SHORT, "loop.total_nimg=64"]})
    result, _ = run_ll2d(proto, str(tmp_path / "pts.npy"), None)
    assert list(result.rows) == ["vae", "vaebm"] and result.gap_closed is None
    assert "gap_closed" not in format_ll2d_table(result)


def test_launcher_dry_run_and_bad_dataset():
    ok = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "metric=ll2d", "dataset=gaussians25",
                         "ll2d.select_every_nimg=640", "dry_run=true"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "select_every_nimg: 640" in ok.stdout and "dataset_ref: gaussians25" in ok.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "metric=ll2d", "dataset=nope.txt"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "metric=ll2d needs dataset=gaussians25" in bad.stderr


@pytest.fixture(scope="module")
def tiny_vae_and_split(tmp_path_factory):
    proto = Toy2DProtocol(**{**SHORT, "vae_overrides": ["loop.total_nimg=30720"]})
    ctx = build_context(proto, "gaussians25", tmp_path_factory.mktemp("ll2d-tiny"))
    return proto, ctx.vae, ctx.train, ctx.val, ctx.test


def test_split_streams_are_independent_and_reproducible(tiny_vae_and_split):
    proto, _, train, val, test = tiny_vae_and_split
    assert (len(train), len(val), len(test)) == (proto.train_points, proto.val_points, proto.test_points)
    again = gaussians25_split(proto)
    assert all(torch.equal(a, b) for a, b in zip((train, val, test), again))
    n = min(len(train), len(val), len(test))
    assert not torch.equal(train[:n], val[:n]) and not torch.equal(val[:n], test[:n])


def test_validation_score_equals_the_density2d_likelihood(tiny_vae_and_split):
    """The cheap scorer (log p_vae precomputed once) against the library path (vaebm_log_likelihood, Eq. 5) fed the
    same mixture components and grid."""
    proto, vae, train, val, _ = tiny_vae_and_split
    scorer = ValidationScorer(vae, val, proto)
    torch.manual_seed(3)
    energy = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=32, num_layers=3))
    mu, sigma = decoder_components(vae, proto.val_marginal_samples, torch.Generator().manual_seed(proto.seed + 505))
    w = proto.grid_half_width
    reference = vaebm_log_likelihood(lambda x: mixture_log_density(x, mu, sigma),
                                     lambda x: energy(x.float()).double(), val,
                                     grid=Grid2D(bounds=((-w, w), (-w, w)), n=proto.val_grid_n,
                                                 input_dtype=torch.float32))
    assert scorer.score(energy) == pytest.approx(float(reference.mean()), abs=1e-5)
    # a bf16 energy (engine.precision=bf16) is scored in its own dtype: the same value to bf16's resolution
    half = EnergyNet(EnergyNetConfig(arch="mlp", data_dim=2, hidden=32, num_layers=3))
    half.load_state_dict(energy.state_dict())
    assert scorer.score(half.to(torch.bfloat16)) == pytest.approx(float(reference.mean()), abs=0.05)


class _PeriodicWells(torch.nn.Module):
    """E(x) = k (sin^2(pi x1 / 2) + sin^2(pi x2 / 2)): wells at the even-integer grid, the 25 centres among them."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.k * torch.sin(0.5 * math.pi * x).pow(2).sum(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def trained_vae(tmp_path_factory):
    proto = Toy2DProtocol(**{**SHORT, "vae_overrides": ["loop.total_nimg=153600", "loop.global_batch=256",
                                                          "loop.batch_size=256"]})
    return build_context(proto, "gaussians25", tmp_path_factory.mktemp("ll2d-vae")).vae


@pytest.mark.parametrize("candidates,step_size,matches", [
    (16, 1e-4, True),  # the protocol's negative phase: pooled SIR + one small Langevin step
    (1, 1e-4, False),  # plain N(0, I) starts with one step: the VAE's energy, not h's
    (16, 5e-2, False),  # a large eps-space step throws the SIR draws out of the wells
])
def test_the_methods_negative_phase_follows_the_vaebm_density(trained_vae, candidates, step_size, matches):
    """VAEBMMethod.negatives on the 2-D VAE against E_h[E] by quadrature with the marginal-mixture p_vae (an
    independent path): the protocol's sampler must match it, and the two broken samplers must not (the test can
    tell them apart)."""
    proto = Toy2DProtocol(**{**SHORT, "grid_half_width": 8.0, "val_grid_n": 320, "val_marginal_samples": 20000})
    energy = _PeriodicWells(k=4.0)
    _, val, _ = gaussians25_split(proto)
    scorer = ValidationScorer(trained_vae, val, proto)
    scorer.score(energy)
    cfg = VAEBMConfig(energy=EnergyNetConfig(arch="mlp", data_dim=2, hidden=16, num_layers=2))
    cfg.sampler.langevin = LangevinConfig(num_steps=1, step_size=step_size)
    cfg.sampler.init_candidates = candidates
    cfg.validate(None)
    ctx = MethodContext(device=torch.device("cpu"), seed=3, rank=0, total_nimg=1, sample_count=4)
    method = VAEBMMethod(cfg, ctx, backbone=trained_vae, backbone_bundle={"kind": "mlp_vae"})
    method.energy_fp32 = energy  # the sampler scores the fixed wells instead of the untrained network
    drawn = []
    for it in range(4):
        method.iteration.value = it
        drawn.append(energy(method.negatives(2048)[0]).reshape(-1))
    drawn = torch.cat(drawn).double()
    gap = abs(float(drawn.mean()) - scorer.exact_mean_energy)
    se = float(drawn.std()) / math.sqrt(len(drawn))
    print(f"K={candidates} eta={step_size}: E_neg {float(drawn.mean()):.4f} E_h[E] {scorer.exact_mean_energy:.4f} "
          f"gap {gap:.4f}")
    if matches:
        # pooled draws repeat (the effective sample size is below the chain count): a wider margin than iid draws
        assert gap < 0.05 + 8 * se
    else:
        assert gap > 0.2
