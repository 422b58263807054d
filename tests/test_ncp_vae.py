"""NCP-VAE (core/methods/ncp_vae.py) against independent references.

- NCE (ncpvae_appendix.md Eq. 10-11): for Gaussian q and p in 1-D and 2-D (and with a context), the trained
  classifier's logit recovers the closed-form log q/p.
- Hierarchical SIR (`sir_eps_z`) with large M on a linear-Gaussian 2-group backbone with quadratic log r_k: the law of
  the draws is the per-group normalized prod_k p_t(z_k|z_<k) r_k / Z_k(z_<k), a Gaussian computed in closed form.
- eps_z Langevin (`latent_langevin`) on the same backbone: the jointly tilted p_t(z) prod_k r_k / Z, another closed-form
  Gaussian; the two laws differ in Var(z_1) here, so each test would fail with the other sampler's target.
- The method on a real backbone (a tiny NVAE): the loss, per-group metrics, export -> build_model round trip (strict),
  every sampler through `TrainedModel.sample`, visuals.
- Digits: an MLP VAE fitted to the 16x16 digits in the test and an NCP-VAE on it; the DigitsScorer classifier
  (trained on the real digits) is at least as confident on NCP-VAE samples as on the VAE's own at the same temperature.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from core.methods.base import MethodContext
from core.methods.bundles import build_model, SampleOptions
from core.methods.ncp_vae import NCPSamplerConfig, NCPVAEConfig, NCPVAEMethod, latent_langevin, sir_eps_z
from core.methods.nvae import vae_bundle
from core.models.distributions import DiagNormal
from core.models.interface import LatentGroup, TowerPass
from core.models.ncp_classifier import NCPClassifierConfig, NCPClassifiers
from core.models.noise_space import NoiseSpaceVAE
from core.objectives.nce import nce_loss
from core.sampling.hierarchical_sir import hierarchical_sir
from core.sampling.langevin import LangevinConfig


# ------------------------------------------------------------------------------------------------ NCE recovers log q/p
def _train_nce(sample_q, sample_p, dim: int, ctx_dim: int, steps: int, seed: int) -> NCPClassifiers:
    torch.manual_seed(seed)
    net = NCPClassifiers([((dim,), (ctx_dim,))], NCPClassifierConfig(mlp_hidden=64, mlp_layers=3))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        zq, cq = sample_q(512, gen)
        zp, cp = sample_p(512, gen)
        logit = net([torch.cat([zq, zp])], [torch.cat([cq, cp])])[0]
        loss = nce_loss([logit[:512]], [logit[512:]]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def _gauss_logpdf(z: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mu.double(), cov.double()).log_prob(z.double())


@pytest.mark.parametrize("dim", [1, 2])
def test_nce_logit_recovers_the_gaussian_log_density_ratio(dim):
    """q = N(m, S), p = N(0, I): the optimal logit is log q(z) - log p(z) (Eq. 8), a quadratic in z.

    Tolerance: the mean |error| over z ~ (q + p) / 2 where |log q/p| < 3 must be below 0.12 nats, while the ratio
    varies with a std of ~1 nat there. The ratio is only identifiable where both densities put mass: beyond
    |log q/p| ~ 3 the classifier saturates (D ~ 0 or 1) and Eq. 11's gradient vanishes, so those points (10-20 % of
    the draws) are left out. The error left is the finite-sample NCE error of 400 steps x 1024 points plus the MLP's
    fit of a quadratic, measured 0.01-0.06 with these seeds. Flipped labels or a constant logit are off by ~1 nat."""
    m = torch.tensor([0.8, -0.5][:dim])
    chol = torch.tensor([[0.6, 0.0], [0.3, 0.5]])[:dim, :dim]
    cov_q = chol @ chol.T
    empty = lambda n: torch.zeros(n, 0)  # noqa: E731
    sample_q = lambda n, g: (m + torch.randn(n, dim, generator=g) @ chol.T, empty(n))  # noqa: E731
    sample_p = lambda n, g: (torch.randn(n, dim, generator=g), empty(n))  # noqa: E731
    net = _train_nce(sample_q, sample_p, dim, 0, 400, seed=dim)
    gen = torch.Generator().manual_seed(100 + dim)
    z = torch.cat([sample_q(2000, gen)[0], sample_p(2000, gen)[0]])
    truth = _gauss_logpdf(z, m, cov_q) - _gauss_logpdf(z, torch.zeros(dim), torch.eye(dim))
    with torch.no_grad():
        logit = net([z], [empty(len(z))])[0].double()
    keep = truth.abs() < 3
    err = (logit - truth)[keep].abs().mean().item()
    print(f"dim={dim}: mean |logit - log q/p| = {err:.4f} nats on {keep.float().mean():.2f} of the points "
          f"(ratio std {truth[keep].std():.3f})")
    assert keep.float().mean() > 0.75 and truth[keep].std() > 0.9
    assert err < 0.12


def test_nce_with_context_recovers_the_conditional_ratio():
    """Context c ~ N(0, 1); p(z|c) = N(c, 1), q(z|c) = N(0.5 c + 0.7, 0.6^2): the logit given (z, c) must be
    log q(z|c) - log p(z|c) (Eq. 11 with c(z_<k) = c), which depends on c; tolerance as above."""
    def sample_q(n, g):
        c = torch.randn(n, 1, generator=g)
        return 0.5 * c + 0.7 + 0.6 * torch.randn(n, 1, generator=g), c

    def sample_p(n, g):
        c = torch.randn(n, 1, generator=g)
        return c + torch.randn(n, 1, generator=g), c

    net = _train_nce(sample_q, sample_p, 1, 1, 500, seed=5)
    gen = torch.Generator().manual_seed(55)
    zq, cq = sample_q(2000, gen)
    zp, cp = sample_p(2000, gen)
    z, c = torch.cat([zq, zp]).double(), torch.cat([cq, cp]).double()
    normal = lambda x, mu, s: -0.5 * ((x - mu) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)  # noqa: E731
    truth = (normal(z, 0.5 * c + 0.7, 0.6) - normal(z, c, 1.0)).squeeze(1)
    with torch.no_grad():
        logit = net([z.float()], [c.float()])[0].double()
    keep = truth.abs() < 3
    err = (logit - truth)[keep].abs().mean().item()
    print(f"conditional: mean |logit - log q/p| = {err:.4f} nats on {keep.float().mean():.2f} of the points "
          f"(ratio std {truth[keep].std():.3f})")
    assert keep.float().mean() > 0.75 and truth[keep].std() > 0.5
    assert err < 0.12


# --------------------------------------------------------------------------- a linear-Gaussian 2-group backbone
A, S = 0.8, 0.6  # p(z1) = N(0, 1), p(z2 | z1) = N(A z1, S^2); the decoder state before group 2 is z1 itself
B1, C1 = 0.5, 0.6  # log r_1(z1) = -B1 z1^2 / 2 + C1 z1
D2, E2 = 1.5, 1.0  # log r_2(z2, c = z1) = -D2 z2^2 / 2 + E2 z1 z2


class LinearGaussianVAE(NoiseSpaceVAE):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # device/dtype for sample_noise

    def latent_shapes(self):
        return [(1,), (1,)]

    def x_shape(self):
        return (2,)

    def walk(self, batch, choose_z, x=None):
        zeros = torch.zeros(batch, 1)
        p1 = DiagNormal(zeros, torch.ones_like(zeros))
        z1 = choose_z(0, p1, None)
        g1 = LatentGroup(z=z1, prior=p1, context=zeros[:, :0])
        p2 = DiagNormal(A * z1, S * torch.ones_like(z1))
        z2 = choose_z(1, p2, None)
        g2 = LatentGroup(z=z2, prior=p2, context=z1)
        return TowerPass(groups=[g1, g2], x_dist=DiagNormal(torch.cat([z1, z2], 1), 0.1 * torch.ones(batch, 2)))


class QuadraticRatio:
    """Stands in for the classifiers: the exact quadratic log r_k above (a known reweighting)."""

    def group_logit(self, k, z, context):
        z = z.reshape(len(z), -1)[:, 0]
        if k == 0:
            return -0.5 * B1 * z**2 + C1 * z
        return -0.5 * D2 * z**2 + E2 * context.reshape(len(z), -1)[:, 0] * z

    def log_ratio(self, tower):
        return sum(self.group_logit(k, g.z, g.context) for k, g in enumerate(tower.groups))


def _per_group_law(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of prod_k p_t(z_k|z_<k) r_k / Z_k(z_<k) (what hierarchical SIR targets), float64."""
    prec1 = 1 / t**2 + B1
    m1, v1 = C1 / prec1, 1 / prec1
    prec2 = 1 / (t * S) ** 2 + D2
    slope, v2 = (A / (t * S) ** 2 + E2) / prec2, 1 / prec2  # z2 | z1 ~ N(slope z1, v2)
    mean = torch.tensor([m1, slope * m1], dtype=torch.float64)
    cov = torch.tensor([[v1, slope * v1], [slope * v1, slope**2 * v1 + v2]], dtype=torch.float64)
    return mean, cov


def _joint_law(t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of p_t(z) r_1 r_2 / Z (what eps_z Langevin targets): -log density = 1/2 z^T P z - h^T z."""
    s2 = (t * S) ** 2
    prec = torch.tensor([[1 / t**2 + A**2 / s2 + B1, -A / s2 - E2], [-A / s2 - E2, 1 / s2 + D2]], dtype=torch.float64)
    h = torch.tensor([C1, 0.0], dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    return cov @ h, cov


def _moments(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = z.double()
    return z.mean(0), torch.cov(z.T)


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_hierarchical_sir_matches_the_per_group_reweighted_gaussian(t):
    """20k chains, M = 256 proposals per group. Tolerances: mean 0.03 and covariance entries 0.03 (MC standard errors
    are ~0.005 and SIR's O(1/M) bias is ~1e-3 here); the prior's own moments and the jointly tilted law's Var(z1) are
    > 0.1 away, so SIR that ignored r or normalized jointly would fail."""
    vae, ratio = LinearGaussianVAE(), QuadraticRatio()
    gen = torch.Generator().manual_seed(3)
    sir = sir_eps_z(vae, ratio, 20_000, 256, t, gen)
    z = torch.cat(vae.T_z(sir.values, t).z, dim=1)
    mean, cov = _moments(z)
    ref_mean, ref_cov = _per_group_law(t)
    _, joint_cov = _joint_law(t)
    print(f"t={t}: SIR mean {mean.tolist()} cov {cov.flatten().tolist()}; closed form {ref_mean.tolist()} "
          f"{ref_cov.flatten().tolist()}; ESS/M per group {sir.ess_fraction}")
    assert (joint_cov[0, 0] - ref_cov[0, 0]).abs() > 0.1  # the two targets are distinguishable here
    assert torch.allclose(mean, ref_mean, atol=0.03)
    assert torch.allclose(cov, ref_cov, atol=0.03)


def test_hierarchical_sir_generic_loop_keeps_each_chains_own_conditional():
    """Per-chain resampling given each chain's own earlier groups: group 0's candidates of chain i all equal i;
    group 1's are 10 * z_0 + j (j < M) with all weight on j = i mod M, so chain i must end at (i, 11 i mod ...)."""
    n, m = 6, 4

    def propose(k, chosen, cands):
        if k == 0:
            return torch.arange(float(n)).view(n, 1, 1).expand(n, cands, 1).clone(), torch.randn(n, cands)
        values = 10 * chosen[0].view(n, 1, 1) + torch.arange(float(cands)).view(1, cands, 1)
        log_w = torch.full((n, cands), -1e4)
        log_w[torch.arange(n), torch.arange(n) % cands] = 0.0
        return values, log_w

    out = hierarchical_sir(2, propose, m, torch.Generator().manual_seed(0))
    i = torch.arange(float(n))
    assert torch.equal(out.values[0].squeeze(1), i)
    assert torch.equal(out.values[1].squeeze(1), 10 * i + i % m)
    assert out.ess_fraction[1] == pytest.approx(1 / m)


def test_eps_z_langevin_matches_the_jointly_tilted_gaussian():
    """eps_z Langevin on U = -sum_k log r_k(T_z(eps)) + |eps|^2 / 2 (make_latent_potential): with a linear T_z and a
    quadratic log r the tilted law is Gaussian (closed form `_joint_law`). 4000 chains, 400 steps of eta = 0.02
    from N(0, I): ULA's O(eta) variance bias is < 1% here, MC errors ~0.02 on the covariance entries; tolerance 0.05
    (the per-group law's Var(z1) is > 0.1 away)."""
    t = 0.9
    vae, ratio = LinearGaussianVAE(), QuadraticRatio()
    gen = torch.Generator().manual_seed(11)
    _, eps_z = vae.sample_noise(4000, generator=gen)
    chains = latent_langevin(vae, ratio, eps_z, LangevinConfig(num_steps=400, step_size=0.02), gen, t)
    z = torch.cat(vae.T_z(chains.state, t).z, dim=1)
    mean, cov = _moments(z)
    ref_mean, ref_cov = _joint_law(t)
    print(f"Langevin mean {mean.tolist()} cov {cov.flatten().tolist()}; closed form {ref_mean.tolist()} "
          f"{ref_cov.flatten().tolist()}")
    assert (_per_group_law(t)[1][0, 0] - ref_cov[0, 0]).abs() > 0.1
    assert torch.allclose(mean, ref_mean, atol=0.05)
    assert torch.allclose(cov, ref_cov, atol=0.05)


# ----------------------------------------------------------------------------- the method on a tiny NVAE backbone
@pytest.fixture(scope="module")
def tiny_nvae():
    from presets import nvae_preset

    from core.models import NVAE

    torch.manual_seed(0)
    return NVAE(nvae_preset("tiny", image_size=16, num_channels_enc=8, num_channels_dec=8)).eval().requires_grad_(False)


def _ctx(**kw) -> MethodContext:
    return MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=64, **kw)


def test_method_on_a_tiny_nvae_trains_exports_and_samples(tiny_nvae, tmp_path):
    """One posterior walk feeds all K conv classifiers (Eq. 10-11): the loss is the summed per-group NCE loss, every
    group reports an accuracy; the exported bundle rebuilds strictly and every sampler runs through `sample`."""
    cfg = NCPVAEConfig(classifier=NCPClassifierConfig(base_channels=8, min_resolution=4),
                       sampler=NCPSamplerConfig(candidates=4, langevin=LangevinConfig(num_steps=3, step_size=1e-2)))
    method = NCPVAEMethod(cfg, _ctx(sample_count=4, sample_temperatures=[1.0, 0.7]), tiny_nvae, vae_bundle(tiny_nvae))
    k = len(tiny_nvae.latent_shapes())
    assert len(method.classifiers) == k and [z for z, _ in method.shapes] == tiny_nvae.latent_shapes()
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    loss, metrics = method.loss(method.classifiers, {"x": x}, nimg=0)
    assert loss.shape == () and math.isfinite(loss.item())
    per_group = [metrics[f"ncp_accuracy/group_{i:02d}"] for i in range(k)]
    assert all(0.0 <= float(a) <= 1.0 for a in per_group)
    # an untrained classifier's loss is about K * 2 log 2 (D ~ 1/2 on both classes)
    assert loss.item() == pytest.approx(k * 2 * math.log(2), rel=0.3)
    loss2, _ = method.loss(method.classifiers, {"x": x}, nimg=0)
    assert torch.equal(loss, loss2)  # the step's noise is a function of (seed, rank, nimg)
    loss.backward()
    assert all(p.grad is not None for p in method.classifiers.parameters())
    paths = method.visuals(tmp_path, 0)
    assert {p.name for p in paths} >= {"nimg-000000000000-t1-ncp.png", "nimg-000000000000-t0.7-backbone.png",
                                       "nimg-000000000000-chains.png"}
    bundle, weights = method.export()
    model = build_model(bundle, weights)
    assert model.kind == "ncp_vae" and model.vae is not None
    for name in ("sir", "langevin", "sir_langevin"):
        model.sampler.method = name
        out = model.sample(3, torch.Generator().manual_seed(1), SampleOptions(temperature=0.7, strip_frames=2))
        assert out.images.shape == (3, 3, 16, 16) and torch.isfinite(out.images).all()
        assert (out.frames is None) == (name == "sir")
    with torch.no_grad():
        z = tiny_nvae.T_z(tiny_nvae.sample_noise(2)[1]).z
    assert model.log_ratio(z).shape == (2,)


# ------------------------------------------------------------------------------------------------- the digits
def test_digits_samples_are_at_least_as_confident_as_the_backbones():
    """An MLP VAE (16-d latent) fitted to the 16x16 digits, then NCP-VAE's classifier on its latent by the method's
    own loss. The DigitsScorer classifier (trained on the real digits) scores 512 decoder means at t = 1 from the VAE's
    prior and from NCP-VAE's SIR draws (M = 32). The reweighted prior avoids the prior holes the aggregate
    posterior leaves (App. B), so its samples must look at least as much like digits."""
    from core.evaluation.sample_score import DigitsScorer, DigitsScorerConfig, real_digits
    from core.models.mlp_vae import MLPVAE, MLPVAEConfig
    from core.objectives.elbo import ELBOConfig, nelbo_loss

    images, _ = real_digits(16, "lanczos")
    data = images.float().flatten(1) / 127.5 - 1
    torch.manual_seed(0)
    vae = MLPVAE(MLPVAEConfig(data_dim=256, latent_dim=16, hidden=256, num_layers=3))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    objective = ELBOConfig(kl_anneal_portion=1.0, kl_const_portion=0.0, kl_min_coeff=0.0, kl_balance=False,
                           norm_coeff=0.0)
    zero = torch.zeros(())
    for step in range(600):
        x = data[torch.randint(len(data), (128,), generator=gen)]
        loss = nelbo_loss(vae.posterior(x), x, (step + 1) / 200, objective, None, zero, zero).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae = vae.eval().requires_grad_(False)

    cfg = NCPVAEConfig(classifier=NCPClassifierConfig(mlp_hidden=128, mlp_layers=3),
                       sampler=NCPSamplerConfig(candidates=32))
    method = NCPVAEMethod(cfg, _ctx(), vae, vae_bundle(vae))
    opt = method.make_optimizer(method.param_groups())
    for step in range(300):
        x = data[torch.randint(len(data), (128,), generator=gen)]
        loss, metrics = method.loss(method.classifiers, {"x": x}, nimg=step * 128)
        opt.zero_grad()
        loss.backward()
        opt.step()
    method.classifiers.eval()
    n, t = 512, 1.0
    eps_x, eps_z = vae.sample_noise(n, generator=torch.Generator().manual_seed(1))
    sir = sir_eps_z(vae, method.classifiers, n, 32, t, torch.Generator().manual_seed(2))
    with torch.no_grad():
        x_vae = vae.T_z(eps_z, t).x_dist.mu.view(n, 1, 16, 16)
        x_ncp = vae.T_z(sir.values, t).x_dist.mu.view(n, 1, 16, 16)
    scorer = DigitsScorer(DigitsScorerConfig(resolution=16, source_size=16, epochs=6))
    s_vae, s_ncp = scorer.score(x_vae), scorer.score(x_ncp)
    print(f"digits, t={t}: classifier accuracy {float(metrics['ncp/accuracy']):.3f}; mean confidence backbone "
          f"{s_vae['mean_confidence']:.4f} vs NCP-VAE {s_ncp['mean_confidence']:.4f}; confident fraction "
          f"{s_vae['confident_fraction']:.3f} vs {s_ncp['confident_fraction']:.3f}; Frechet "
          f"{s_vae['frechet_distance']:.2f} vs {s_ncp['frechet_distance']:.2f}; SIR ESS/M {sir.ess_fraction}")
    assert s_ncp["mean_confidence"] >= s_vae["mean_confidence"]
