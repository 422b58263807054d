"""The joint latent EBM prior (core/methods/latent_ebm.py, core/models/latent_energy.py) against closed forms.

- The eps_z sampler on a two-group linear-Gaussian backbone with a quadratic f: the tilted prior
  exp(f(z)) p(z) / Z is Gaussian with precision Sigma^-1 + Q (joint_latent_ebm_prior.md Eq. 6), so the Langevin
  chains' mean and covariance (and those of the hierarchical-sampling conditional and of the SIR starts) are
  compared with float64 linear algebra.
- The method's loss gradient equals Eq. 10 / 17 computed sample by sample with autograd.
- Table 12's per-group networks: shapes, parameter counts (Table 10's ~10M on the 30-group CIFAR-10 NVAE), f = 0
  at initialization, per-sample independence.
- The published model: bundle round trip and E(x) = -log E_{p(z|x)}[exp f(z)] against a prior-sampling brute force.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from core.methods import SampleOptions, build_model
from core.methods.base import MethodContext
from core.methods.latent_ebm import (LatentEBMConfig, LatentEBMMethod, hierarchical_samples, latent_negatives,
                                     parse_latent_groups, sir_latent_start)
from core.methods.nvae import vae_bundle
from core.models.distributions import DiagNormal
from core.models.interface import LatentGroup, TowerPass
from core.models.latent_energy import LatentEnergy, LatentEnergyConfig
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.models.noise_space import NoiseSpaceVAE
from core.sampling.langevin import LangevinConfig

D = 2  # dimension of each of the two latent groups


class LinearGaussianVAE(NoiseSpaceVAE):
    """z0 ~ N(0, I), z1 | z0 ~ N(W z0 + c, diag s^2), x | z ~ N([z0, z1], 0.1^2): T_z is linear, p(z) Gaussian.
    The encoder is q(z0|x) = N(x[:D], 0.1^2), q(z1|x, z0) = N(x[D:], 0.1^2)."""

    def __init__(self, post_sigma: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(torch.tensor([[0.8, -0.5], [0.3, 0.6]]), requires_grad=False)
        self.c = nn.Parameter(torch.tensor([0.5, -1.0]), requires_grad=False)
        self.s = nn.Parameter(torch.tensor([0.7, 1.3]), requires_grad=False)
        self.post_sigma = post_sigma

    def latent_shapes(self):
        return [(D,), (D,)]

    def x_shape(self):
        return (2 * D,)

    def walk(self, batch, choose_z, x=None):
        zeros = torch.zeros(batch, D)
        groups, z = [], []
        for i in range(2):
            prior = (DiagNormal(zeros, torch.ones_like(zeros)) if i == 0 else
                     DiagNormal(z[0] @ self.W.T + self.c, self.s.expand(batch, D)))
            post = None if x is None else DiagNormal(x[:, i * D:(i + 1) * D], torch.full((batch, D), self.post_sigma))
            z.append(choose_z(i, prior, post))
            groups.append(LatentGroup(z=z[-1], prior=prior, context=zeros[:, :0], posterior=post))
        xz = torch.cat(z, dim=1)
        return TowerPass(groups=groups, x_dist=DiagNormal(xz, torch.full_like(xz, 0.1)))

    def prior_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the joint Gaussian p(z0, z1), float64."""
        W, c, s = self.W.double(), self.c.double(), self.s.double()
        mean = torch.cat([torch.zeros(D, dtype=torch.float64), c])
        cov = torch.cat([torch.cat([torch.eye(D, dtype=torch.float64), W.T], 1),
                         torch.cat([W, W @ W.T + torch.diag(s**2)], 1)])
        return mean, cov


class QuadraticTilt(nn.Module):
    """f(z) = -1/2 z^T Q z + b^T z on z = [z0, z1] (one 'group' term per latent group would be the same sum)."""

    def __init__(self):
        super().__init__()
        self.Q = nn.Parameter(torch.tensor([[1.5, 0.3, 0.0, 0.2], [0.3, 0.8, 0.1, 0.0], [0.0, 0.1, 0.6, -0.2],
                                            [0.2, 0.0, -0.2, 1.0]]), requires_grad=False)
        self.b = nn.Parameter(torch.tensor([1.0, -0.8, 0.6, 1.2]), requires_grad=False)

    def f(self, z):
        v = torch.cat([g.reshape(g.shape[0], -1) for g in z], 1)
        return -0.5 * ((v @ self.Q) * v).sum(1) + v @ self.b


def tilted_moments(vae: LinearGaussianVAE, tilt: QuadraticTilt) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(-1/2 z'Qz + b'z) N(z; m, S) = N(z; P^-1 (S^-1 m + b), P^-1), P = S^-1 + Q (float64)."""
    m, S = vae.prior_moments()
    S_inv = torch.linalg.inv(S)
    cov = torch.linalg.inv(S_inv + tilt.Q.double())
    return cov @ (S_inv @ m + tilt.b.double()), cov


def _moments(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.double()
    return v.mean(0), torch.cov(v.T)


@pytest.fixture(scope="module")
def linear():
    return LinearGaussianVAE().eval(), QuadraticTilt()


def test_eps_z_langevin_samples_the_tilted_gaussian(linear):
    """4,000 chains x 300 steps of eta = 0.05: the mixing residual (1 - eta/2)^300 < 1e-3, the discretization bias of
    the covariance ~ eta * lambda / 4 ~ 2%, Monte Carlo standard errors ~ 0.02. A flipped sign of f, a missing
    1/2 ||eps||^2 or a Langevin in z instead of eps each move some moment by > 0.3."""
    vae, tilt = linear
    mean, cov = tilted_moments(vae, tilt)
    gen = torch.Generator().manual_seed(0)
    _, eps_z = vae.sample_noise(4000, generator=gen)
    result = latent_negatives(vae, tilt, eps_z, LangevinConfig(num_steps=300, step_size=0.05), gen)
    z = torch.cat(vae.T_z(result.state).z, 1)
    got_mean, got_cov = _moments(z)
    prior_mean, _ = vae.prior_moments()
    assert (mean - prior_mean).abs().max() > 0.3  # the tilt matters: the test can tell prior from tilted law
    assert torch.allclose(got_mean, mean, atol=0.06), (got_mean, mean)
    assert torch.allclose(got_cov, cov, atol=0.06, rtol=0.05), (got_cov, cov)
    assert result.num_nonfinite == 0


def test_hierarchical_sampling_is_the_tilted_conditional(linear):
    """keep = [1]: z0 from the encoder (held fixed), z1 ~ p_tilted(z1 | z0), a Gaussian conditional in closed form;
    keep = [2] is the reconstruction (the posterior sample of both groups)."""
    vae, tilt = linear
    mean, cov = tilted_moments(vae, tilt)
    x = torch.tensor([[0.7, -0.4, 1.5, 0.2]]).repeat(3000, 1)
    torch.manual_seed(1)  # the encoder's posterior sample uses the global generator
    gen = torch.Generator().manual_seed(2)
    vae.post_sigma = 1e-4  # z0 = x[:D] up to 1e-4: one conditioning value for all rows
    try:
        cond, recon = hierarchical_samples(vae, tilt, x, [1, 2], LangevinConfig(num_steps=300, step_size=0.05), gen)
    finally:
        vae.post_sigma = 0.1
    z0 = x[0, :D].double()
    c01 = cov[:D, D:]
    want_mean = mean[D:] + c01.T @ torch.linalg.solve(cov[:D, :D], z0 - mean[:D])
    want_cov = cov[D:, D:] - c01.T @ torch.linalg.solve(cov[:D, :D], c01)
    assert torch.allclose(cond[:, :D].double(), z0.expand(len(x), D), atol=1e-3)
    got_mean, got_cov = _moments(cond[:, D:])
    assert torch.allclose(got_mean, want_mean, atol=0.06), (got_mean, want_mean)
    assert torch.allclose(got_cov, want_cov, atol=0.05, rtol=0.05), (got_cov, want_cov)
    assert torch.allclose(recon.double(), x.double(), atol=1e-3)


def test_sir_starts_approach_the_tilted_law(linear):
    """SIR with 256 N(0, I) candidates per chain weighted by exp(f(T_z(eps))) (pooled): the starts' mean is that of
    the tilted law up to SIR's finite-pool bias; plain N(0, I) starts keep the prior's mean."""
    vae, tilt = linear
    mean, _ = tilted_moments(vae, tilt)
    prior_mean, _ = vae.prior_moments()
    gen = torch.Generator().manual_seed(3)
    init = sir_latent_start(vae, tilt, lambda n: vae.sample_noise(n, generator=gen)[1], 2000, 256, gen)
    got = torch.cat(vae.T_z(init.state).z, 1).double().mean(0)
    assert torch.allclose(got, mean, atol=0.08), (got, mean)
    assert 0.0 < init.ess_fraction < 1.0
    plain = sir_latent_start(vae, tilt, lambda n: vae.sample_noise(n, generator=gen)[1], 2000, 1, gen)
    assert torch.allclose(torch.cat(vae.T_z(plain.state).z, 1).double().mean(0), prior_mean, atol=0.1)


# ------------------------------------------------------------------------------------------------- the gradient
def _method(vae, **sampler) -> LatentEBMMethod:
    cfg = LatentEBMConfig(energy=LatentEnergyConfig(hidden=16, num_linear=2))
    cfg.sampler.langevin = LangevinConfig(num_steps=3, step_size=0.05)
    for k, v in sampler.items():
        setattr(cfg.sampler, k, v)
    cfg.buffer.capacity, cfg.buffer.anneal_iterations = 64, 1
    cfg.validate(None)
    ctx = MethodContext(device=torch.device("cpu"), seed=11, rank=0, total_nimg=1000, sample_count=4)
    m = LatentEBMMethod(cfg, ctx, backbone=vae, backbone_bundle={"kind": "test"})
    for p in m.energy.parameters():  # away from the zero-initialized head, so every layer has a gradient
        nn.init.normal_(p, std=0.3)
    return m


@pytest.mark.parametrize("persistent", [False, True])
def test_loss_gradient_is_eq10(linear, persistent):
    """d loss / d alpha = -(mean_i grad f(z+_i) - mean_j grad f(z-_j)) (Eq. 10 / 17), each per-sample gradient
    computed on its own (no batching, no concatenation, no CD helper), with the same z+ and z- the step used."""
    vae, _ = linear
    m = _method(vae, persistent=persistent)
    x = torch.randn(6, 2 * D, generator=torch.Generator().manual_seed(4))
    m.iteration.value = 3
    if persistent:  # a filled buffer: replayed chains take part
        m.buffer.push([torch.randn(16, D), torch.randn(16, D)])
    z_pos = m.positives(x)
    z_neg = m.negatives(6)[0]
    # neither call advances the step counter nor fills the buffer: loss() draws the very same z+ and z-
    params = list(m.energy.parameters())
    loss, metrics = m.loss(m.energy, {"x": x}, 6)
    got = torch.autograd.grad(loss, params)

    def mean_grad(z):
        total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for i in range(z[0].shape[0]):
            g = torch.autograd.grad(m.energy.f([zl[i:i + 1] for zl in z]).sum(), params)
            total = [t + gi.double() for t, gi in zip(total, g)]
        return [t / z[0].shape[0] for t in total]

    eq10 = [a - b for a, b in zip(mean_grad(z_pos), mean_grad(z_neg))]
    for g, ref in zip(got, eq10):
        assert torch.allclose(g.double(), -ref, atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        f_pos, f_neg = m.energy(z_pos), m.energy(z_neg)
    assert float(metrics["ebm/energy_gap"]) == pytest.approx(float(f_pos.sum(1).mean() - f_neg.sum(1).mean()),
                                                             abs=1e-5)
    for i in range(2):
        assert float(metrics[f"energy_pos/group_{i:02d}"]) == pytest.approx(-float(f_pos[:, i].mean()), abs=1e-6)
        assert float(metrics[f"energy_neg/group_{i:02d}"]) == pytest.approx(-float(f_neg[:, i].mean()), abs=1e-6)
    assert m.iteration.value == 4


def test_divergence_is_detected_like_vaebm(linear):
    m = _method(linear[0])
    assert m.health({"ebm/energy_gap": 3.0, "langevin/nonfinite": 0.0}) is None
    assert "exceeds" in m.health({"ebm/energy_gap": 2e4})
    assert "exceeds" in m.health({"ebm/energy_gap": float("nan")})
    assert "non-finite" in m.health({"ebm/energy_gap": 1.0, "langevin/nonfinite": 2.0})


# ----------------------------------------------------------------------------------------------- the networks
def _table12_params(shape, channels=64, hidden=200, num_linear=2) -> int:
    """Parameters of Table 12's f_alpha_i by hand: convs of 4x4 kernels with bias, then the linears."""
    c, side, total = shape[0], shape[1], 0
    while side > 4:
        total += c * channels * 16 + channels
        c, side = channels, side // 2
    width = c * side * side
    for _ in range(num_linear):
        total += width * hidden + hidden
        width = hidden
    return total + width + 1


def test_table12_networks():
    shapes = parse_latent_groups(["30x20x16x16"])
    assert len(shapes) == 30 and shapes[0] == (20, 16, 16)
    with torch.device("meta"):
        net = LatentEnergy(LatentEnergyConfig(), shapes)
    count = sum(p.numel() for p in net.parameters())
    assert count == 30 * _table12_params((20, 16, 16))
    assert 9.5e6 < count < 10.5e6  # Table 10: 10M on the 30-group CIFAR-10 NVAE
    hq = parse_latent_groups(["4x20x8x8", "4x20x16x16", "4x20x32x32", "4x20x64x64", "4x20x128x128"])
    with torch.device("meta"):
        net = LatentEnergy(LatentEnergyConfig(), hq)
    convs = [sum(isinstance(m, nn.Conv2d) for m in g.modules()) for g in net.groups]
    assert convs == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4  # down to 4x4
    assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for g in net.groups for m in g.modules()
               if isinstance(m, (nn.LeakyReLU, nn.ReLU)))
    with pytest.raises(ValueError, match="power of 2"):
        LatentEnergyConfig().num_convs((20, 12, 12))


def test_energy_starts_at_zero_and_is_per_sample():
    torch.manual_seed(0)
    shapes = [(4, 8, 8), (4, 4, 4), (6,)]
    net = LatentEnergy(LatentEnergyConfig(channels=8, hidden=16), shapes)
    z = [torch.randn(5, *s) for s in shapes]
    assert torch.equal(net(z), torch.zeros(5, 3))  # f = 0: the prior starts as the backbone's
    for p in net.parameters():
        nn.init.normal_(p, std=0.2)
    full = net(z)
    assert full.shape == (5, 3) and torch.allclose(net.f(z), full.sum(1))
    alone = torch.cat([net([g[i:i + 1] for g in z]) for i in range(5)])
    assert torch.allclose(full, alone, atol=1e-6)


# ------------------------------------------------------------------------------------------ the published model
def test_published_model_round_trip_and_energy():
    """E(x) of the `latent_ebm` kind (SNIS with K = 100k samples of an untrained, hence poor, q) against
    -log E_{p(z|x)}[e^f] by brute force over 200k prior draws: E_p[p(x|z) e^f] / E_p[p(x|z)]. Backbone: the
    linear-Gaussian MLP VAE (affine maps)."""
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=2, num_layers=1)).eval().requires_grad_(False)
    cfg = LatentEBMConfig(energy=LatentEnergyConfig(hidden=8, num_linear=1), energy_posterior_samples=100_000)
    cfg.sampler.test_steps = 5
    ctx = MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=10, sample_count=4)
    m = LatentEBMMethod(cfg, ctx, backbone=vae, backbone_bundle=vae_bundle(vae))
    for p in m.energy.parameters():
        nn.init.normal_(p, std=0.5)
    bundle, weights = m.export()
    model = build_model(bundle, weights)
    assert model.kind == "latent_ebm" and model.energy_based and model.vae is not None
    z = [torch.randn(7, 2)]
    assert torch.equal(model.energy_net(z), m.energy(z))

    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    torch.manual_seed(1)
    got = model.energy(x)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        _, eps_z = vae.sample_noise(200_000, generator=gen)
        tower = vae.T_z(eps_z)
        f = m.energy.f(tower.z).double()
        want = []
        for xi in x:
            log_px = tower.x_dist.log_prob(xi.expand(200_000, 2)).sum(1).double()
            want.append(-(torch.logsumexp(log_px + f, 0) - torch.logsumexp(log_px, 0)))
    assert torch.allclose(got, torch.stack(want), atol=0.015), (got, want)
    assert float(got.abs().max()) > 0.1  # a non-trivial tilt

    gen = torch.Generator().manual_seed(2)
    samples = model.sample(6, gen, SampleOptions(strip_frames=5, use_mean=False))
    assert samples.images.shape == (6, 2) and len(samples.frames) == 6  # the start and every step


# ------------------------------------------------------------------------------------------------ the 2-D row
def test_ll2d_row_on_a_reduced_protocol(tmp_path):
    """The row on a reduced 2-D protocol (core/evaluation/ll2d_latent_ebm.py): per-point log-likelihoods for every
    test point, log Z by 20k prior draws agreeing with the grid integral of the unnormalized mixture (an
    independent estimator) within 5 standard errors + quadrature error, and the trained weights cached by name."""
    from core.evaluation.ll2d_latent_ebm import LatentEBMRowConfig, ll2d_row
    from core.evaluation.toy2d import Toy2DProtocol, build_context

    proto = Toy2DProtocol(vae_overrides=["loop.total_nimg=102400"], train_points=3000, test_points=1000, val_points=500,
                          marginal_samples=4000, grid_n=120, grid_half_width=12.0)  # a weak VAE: a wider box holds all of its mass
    ctx = build_context(proto, "gaussians25", cache_dir=tmp_path)
    config = LatentEBMRowConfig(steps=40, batch=128, eval_every=20, val_components=2000)
    row = ll2d_row(ctx, config)
    assert row.log_likelihood.shape == (1000,) and row.log_likelihood.dtype == torch.float64
    assert bool(torch.isfinite(row.log_likelihood).all())
    assert row.log_z_stderr >= 0 and abs(row.log_z - row.log_z_check) < 5 * row.log_z_stderr + 0.02
    assert row.extra["active_units"] >= 1 and any(tmp_path.glob("ll2d-*-latent_ebm-*.pt"))
    again = ll2d_row(ctx, config)  # from the cache: the same numbers
    assert torch.equal(again.log_likelihood, row.log_likelihood)


def test_iwae_of_the_reweighted_prior_adds_f_and_subtracts_its_log_partition():
    """metric=iwae on p(z) exp(f(z)) / Z with a constant f = c (head biases only): log Z is exactly c with zero
    spread, and the model's NLL equals its backbone's from the same importance samples. Dropping f from the weights
    or forgetting to subtract log Z moves the NLL by c."""
    from presets import nvae_preset

    from core.dist import DistInfo
    from core.evaluation.jobs import EvaluateConfig, run_iwae
    from core.methods.latent_ebm import LatentEBMModel, LatentSamplerConfig
    from core.methods.nvae import VAEModel
    from core.models import NVAE

    torch.manual_seed(0)
    backbone = NVAE(nvae_preset("tiny", image_size=16, num_channels_enc=8, num_channels_dec=8)).eval()
    backbone.requires_grad_(False)
    energy = LatentEnergy(LatentEnergyConfig(channels=8, hidden=16), backbone.latent_shapes()).eval()
    with torch.no_grad():
        for i, group in enumerate(energy.groups):
            group.head.bias.fill_(0.25 * (i + 1))
    c = sum(0.25 * (i + 1) for i in range(len(energy.groups)))
    config = EvaluateConfig(metric="iwae", dataset_ref="digits", data={"size": 16}, eval_samples=8, batch_size=4,
                            iwae_samples=3, iwae_log_z_samples=16)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rows, metrics = run_iwae(config, info, LatentEBMModel(backbone, energy, LatentSamplerConfig()))
    _, backbone_metrics = run_iwae(config, info, VAEModel(backbone))
    assert rows[0]["log_z"] == pytest.approx(c, abs=1e-6) and rows[0]["log_z_stderr"] == pytest.approx(0, abs=1e-9)
    assert metrics["iwae/nll_nats"] == pytest.approx(backbone_metrics["iwae/nll_nats"], abs=1e-4)
