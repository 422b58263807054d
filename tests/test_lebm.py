"""LEBM and the joint EBM prior (core/methods/lebm.py, core/models/lebm_nets.py) against closed forms.

The samplers run the real code path (LatentEBMModel.transform / energy / reconstruction_energy, prior_potential,
posterior_potential, core.sampling.langevin.run_langevin) with networks swapped for ones whose laws are known:
- a quadratic f: the prior is Gaussian; the stationary law of the Langevin update z <- z - (eta/2) P (z - m) +
  sqrt(eta) w is N(m, P^-1 (I - eta P / 4)^-1) exactly (the continuous-time law plus the discretization's inflation),
  so the test also pins eta = s^2;
- a two-component tilt: exp(f) N(0, 1) is a mixture of two unit Gaussians with known weights;
- a linear generator: the posterior is Gaussian in closed form;
- the two-layer joint prior with a linear p(z1|z2): Gaussian in eps-space (App. A.3), mapped back through T.
The transcription error of the supplement's listing (`+ 1.0 / z` for the gradient of ||z||^2 / 2) fails the same
prior check. On the digits, training lowers the reconstruction error and the EBM prior's samples are recognized more
confidently by a digits classifier than the same generator's samples under N(0, I).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from core.methods import MethodContext, SampleOptions, build_model
from core.methods.lebm import (LEBMConfig, LEBMMethod, langevin_config, paper_step_to_eta, posterior_potential,
                               prior_potential, sample_posterior, sample_prior)
from core.models.lebm_nets import GeneratorConfig, LatentEBMModel, PriorEBMConfig
from core.sampling.langevin import run_langevin

S0, S1 = 0.4, 0.1  # lebm_supplement.md Table 1


class Quadratic(nn.Module):
    """f(z) = -1/2 z^T A z + b^T z (per sample)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (-0.5 * ((z @ self.a) * z).sum(1) + z @ self.b).unsqueeze(1)


class TwoGaussianTilt(nn.Module):
    """f(z) = log(w1 exp(m1 z - m1^2/2) + w2 exp(m2 z - m2^2/2)): exp(f) N(z; 0, 1) = w1 N(m1, 1) + w2 N(m2, 1)."""

    def __init__(self, w1: float, m1: float, m2: float):
        super().__init__()
        self.register_buffer("logw", torch.tensor([math.log(w1), math.log(1 - w1)]))
        self.register_buffer("m", torch.tensor([m1, m2]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(self.logw + self.m * z - 0.5 * self.m ** 2, dim=1, keepdim=True)


def _model(z_dim: int, layers: int = 1, top_dim: int = 2) -> LatentEBMModel:
    return LatentEBMModel(GeneratorConfig(arch="dcgan16", out_channels=1, ngf=4, z_dim=z_dim, top_dim=top_dim,
                                          layers=layers), PriorEBMConfig(hidden=8))


def ula_gaussian(precision: torch.Tensor, mean: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stationary (mean, covariance) of z <- z - (eta/2) P (z - m) + sqrt(eta) w: C solves C = (I - eta P/2) C
    (I - eta P/2) + eta I, i.e. C = P^-1 (I - eta P / 4)^-1 (P symmetric), in float64."""
    p = precision.double()
    eye = torch.eye(len(p), dtype=torch.float64)
    return mean.double(), torch.linalg.inv(p @ (eye - eta * p / 4))


def gaussian_mismatch(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """Largest error of the sample mean and covariance against (mean, cov), in units of the reference scale."""
    x = samples.double()
    scale = cov.diagonal().max().sqrt()
    err_mean = (x.mean(0) - mean).abs().max() / scale
    err_cov = (torch.cov(x.T).reshape(cov.shape) - cov).abs().max() / scale ** 2
    return float(max(err_mean, err_cov))


# ------------------------------------------------------------------------------------------------ step size
def test_paper_step_size_s_runs_as_eta_s_squared():
    """One update of run_langevin with eta = paper_step_to_eta(s) is the listing's z - (s^2/2) grad U + s w."""
    assert paper_step_to_eta(0.4) == pytest.approx(0.16) and paper_step_to_eta(0.1) == pytest.approx(0.01)
    model = _model(3)
    z0 = [torch.randn(5, 3)]
    potential = prior_potential(model)
    result = run_langevin(potential, z0, langevin_config(1, S0), torch.Generator().manual_seed(7))
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    z = z0[0].clone().requires_grad_(True)
    f = model.energy([z]).sum()
    grad_f = torch.autograd.grad(f, z)[0]
    expected = z0[0] - 0.5 * S0 * S0 * (-grad_f + z0[0]) + S0 * w  # App. D with the Gaussian term's gradient z
    torch.testing.assert_close(result.state[0], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ prior sampler
A = torch.tensor([[1.0, 0.4, 0.0], [0.4, 0.5, -0.2], [0.0, -0.2, 0.0]])
B = torch.tensor([0.5, -1.0, 0.3])


def _prior_chains(model: LatentEBMModel, steps: int, s: float, n: int = 8000, potential=None) -> list[torch.Tensor]:
    init = model.sample_noise(n, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    if potential is None:
        return sample_prior(model, init, steps, s, gen).state
    return run_langevin(potential, init, langevin_config(steps, s), gen).state


@pytest.fixture(scope="module")
def quadratic_prior() -> tuple[LatentEBMModel, torch.Tensor, torch.Tensor]:
    """exp(f) N(0, I) = N(mu, Sigma): precision P = I + A, mean P^-1 b (lebm_supplement.md A.4)."""
    model = _model(3)
    model.f[0] = Quadratic(A, B)
    precision = torch.eye(3) + A
    return model, precision, torch.linalg.solve(precision, B)


def test_prior_chains_reach_the_tilted_gaussian(quadratic_prior):
    model, precision, mean = quadratic_prior
    mean, cov = ula_gaussian(precision, mean, S0 ** 2)
    z = _prior_chains(model, 150, S0)[0]  # slowest contraction 1 - eta * 1 / 2 = 0.92 per step
    err = gaussian_mismatch(z, mean, cov)
    assert err < 0.03
    # the test separates step-size conventions: eta = s (not s^2) has a visibly different stationary law
    _, cov_wrong = ula_gaussian(precision, mean, S0)
    assert gaussian_mismatch(z, mean, cov_wrong) > 3 * err


def test_supplement_listing_transcription_error_is_rejected(quadratic_prior):
    """App. D's `z_grad + 1.0 / z.data` would be the drift of U = -f(z) + sum log|z|, not -f(z) + ||z||^2 / 2."""
    model, precision, mean = quadratic_prior
    mean, cov = ula_gaussian(precision, mean, S0 ** 2)

    def listing_potential(state):
        z = state[0]
        return -model.energy([z]) + torch.log(z.abs()).sum(1)

    z = _prior_chains(model, 150, S0, potential=listing_potential)[0]
    finite = torch.isfinite(z).all(1)
    assert not finite.all() or gaussian_mismatch(z[finite], mean, cov) > 0.2


def test_prior_chains_reach_the_mixture_weights_of_a_two_component_tilt():
    w1, m1, m2 = 0.3, -1.5, 1.5
    model = _model(1)
    model.f[0] = TwoGaussianTilt(w1, m1, m2)
    s = 0.2  # a smaller step than s0: the mixture's law is the continuous-time one, up to O(s^2)
    z = _prior_chains(model, 1000, s)[0][:, 0].double()  # chains start 50/50 and must move mass between modes
    phi = lambda m: 0.5 * (1 + math.erf(m / math.sqrt(2)))  # noqa: E731  P(N(m, 1) > 0)
    p_right = w1 * phi(m1) + (1 - w1) * phi(m2)
    assert float((z > 0).double().mean()) == pytest.approx(p_right, abs=0.02)
    assert float(z.mean()) == pytest.approx(w1 * m1 + (1 - w1) * m2, abs=0.06)


def test_two_layer_prior_samples_the_joint_law_through_eps_space():
    """Joint prior exp(f1(z1) + f2(z2)) N(z1; C z2 + c, diag(s^2)) N(z2; 0, I) (joint_latent_ebm_prior.md Eq. 6)
    with quadratic f's is Gaussian; in eps-space (App. A.3, z = M eps + m) its potential is quadratic too, so the
    chain's stationary law is known exactly and is pushed to z through T."""
    d1, d2 = 2, 2
    model = _model(d1, layers=2, top_dim=d2)
    a1, b1 = torch.tensor([[0.8, 0.3], [0.3, 0.4]]), torch.tensor([0.4, -0.2])
    a2, b2 = torch.tensor([[0.5, 0.0], [0.0, 0.2]]), torch.tensor([-0.3, 0.6])
    cm, c0 = torch.tensor([[0.7, -0.4], [0.2, 0.5]]), torch.tensor([0.3, -0.1])
    log_s = torch.tensor([-0.3, 0.2])
    model.f[0], model.f[1] = Quadratic(a1, b1), Quadratic(a2, b2)
    top = nn.Linear(d2, 2 * d1)
    with torch.no_grad():
        top.weight.copy_(torch.cat([cm, torch.zeros(d1, d2)]))
        top.bias.copy_(torch.cat([c0, log_s]))
    model.top = top
    # z = M eps + m with eps = (eps1, eps2): z1 = C eps2 + c + s * eps1, z2 = eps2
    s = log_s.exp()
    m_mat = torch.zeros(4, 4)
    m_mat[:2, :2] = torch.diag(s)
    m_mat[:2, 2:] = cm
    m_mat[2:, 2:] = torch.eye(2)
    m_vec = torch.cat([c0, torch.zeros(2)])
    # U(eps) = -f1(z1) - f2(z2) + ||eps||^2/2 = 1/2 eps^T P eps - q^T eps + const
    a_z = torch.block_diag(a1, a2)
    b_z = torch.cat([b1, b2])
    p_eps = m_mat.T @ a_z @ m_mat + torch.eye(4)
    q_eps = m_mat.T @ (b_z - a_z @ m_vec)
    mean_e, cov_e = ula_gaussian(p_eps, torch.linalg.solve(p_eps, q_eps), S0 ** 2)
    mean_z = m_mat.double() @ mean_e + m_vec.double()
    cov_z = m_mat.double() @ cov_e @ m_mat.double().T
    eps = _prior_chains(model, 150, S0)
    with torch.no_grad():
        z = torch.cat(model.transform(eps), dim=1)
    assert gaussian_mismatch(z, mean_z, cov_z) < 0.03


# ------------------------------------------------------------------------------------------------ posterior sampler
def test_posterior_chains_reach_the_exact_posterior_of_a_linear_gaussian_generator():
    """x = W z + c + sigma e with the quadratic prior: p(z|x) = N(P^-1 (b + W^T (x - c) / sigma^2), P^-1),
    P = I + A + W^T W / sigma^2 (lebm_supplement.md A.8's posterior target)."""
    d, shape = 3, (1, 4, 4)
    model = _model(d)
    model.f[0] = Quadratic(A, B)
    gen = torch.Generator().manual_seed(3)
    w = 0.15 * torch.randn(16, d, generator=gen)
    c = 0.1 * torch.randn(16, generator=gen)
    lin = nn.Linear(d, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(c)
    model.g = nn.Sequential(nn.Flatten(), lin, nn.Unflatten(1, shape))
    sigma = model.config.sigma
    x_obs = (w @ torch.tensor([0.8, -0.5, 1.2]) + c + sigma * torch.randn(16, generator=gen)).reshape(1, *shape)
    precision = torch.eye(d) + A + w.T @ w / sigma ** 2
    mean = torch.linalg.solve(precision, B + w.T @ (x_obs.flatten() - c) / sigma ** 2)
    n = 4000
    x = x_obs.expand(n, *shape)
    init = model.sample_noise(n, generator=torch.Generator().manual_seed(4))
    steps = 600  # slowest contraction 1 - eta * p_min / 2 < 0.985 per step at s1 = 0.1 (p_min > 3 here)
    z = sample_posterior(model, x, init, steps, S1, torch.Generator().manual_seed(5)).state[0]
    ref_mean, ref_cov = ula_gaussian(precision, mean, S1 ** 2)
    assert gaussian_mismatch(z, ref_mean, ref_cov) < 0.04
    # and the posterior potential is -log p(z|x) up to a constant: differences match the closed form
    u = posterior_potential(model, x[:3])([z[:3]])
    exact = 0.5 * (((z[:3] - mean) @ precision) * (z[:3] - mean)).sum(1)
    torch.testing.assert_close(u - u[0], exact - exact[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ learning on digits
def _digits(n: int, size: int = 16) -> torch.Tensor:
    from core.evaluation.sample_score import real_digits, to_classifier_input

    images, _ = real_digits(32, "lanczos")
    return to_classifier_input(images[:n], size)  # (n, 1, 16, 16) in [-1, 1], the data pipeline's conversion


@pytest.fixture(scope="module")
def trained_digits_model():
    """A short in-process LEBM run on the first 1200 digits (the quickstart's architecture, narrower, with shorter
    chains: K0 = 20, K1 = 5; about 10 s on one core)."""
    torch.manual_seed(0)
    cfg = LEBMConfig(generator=GeneratorConfig(arch="dcgan16", out_channels=1, ngf=8, z_dim=16))
    cfg.sampler.prior_steps, cfg.sampler.posterior_steps = 20, 5
    cfg.optim.lr, cfg.optim.ebm_lr = 2e-3, 4e-4
    ctx = MethodContext(device=torch.device("cpu"), seed=0, rank=0, total_nimg=1, sample_count=16)
    method = LEBMMethod(cfg, ctx)
    opt = method.make_optimizer(method.param_groups())
    data = _digits(1200)
    heldout = _digits(1797)[1200:1500]
    bundle, weights = method.export()
    untrained = build_model(bundle, weights)
    gen = torch.Generator().manual_seed(0)
    mses = []
    for step in range(120):
        x = data[torch.randint(0, len(data), (32,), generator=gen)]
        loss, metrics = method.loss(method.model, {"x": x}, step * 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mses.append(float(metrics["lebm/mse"]))
    bundle, weights = method.export()
    return untrained, build_model(bundle, weights), heldout, mses


def test_training_lowers_the_reconstruction_error_on_held_out_digits(trained_digits_model):
    untrained, trained, heldout, mses = trained_digits_model
    assert sum(mses[-30:]) / 30 < 0.6 * sum(mses[:10]) / 10
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    before = float((untrained.reconstruct(heldout, gen()) - heldout).pow(2).mean())
    after = float((trained.reconstruct(heldout, gen()) - heldout).pow(2).mean())
    print(f"held-out reconstruction MSE per pixel: {before:.4f} untrained -> {after:.4f} trained")
    assert after < 0.6 * before


def test_ebm_prior_samples_look_more_like_digits_than_the_gaussian_prior(trained_digits_model):
    """DigitsScorer: the prior's samples (K0 chain) against the same generator's samples under N(0, I), from the
    same starting noise (lebm_supplement.md Table 4: the EBM prior against a fixed Gaussian prior)."""
    from core.evaluation.sample_score import DigitsScorer

    _, trained, _, _ = trained_digits_model
    scorer = DigitsScorer()
    ebm = trained.sample(400, torch.Generator().manual_seed(5), SampleOptions()).images  # K0 steps, as trained
    gauss = trained.sample(400, torch.Generator().manual_seed(5), SampleOptions(steps=0)).images
    s_ebm, s_gauss = scorer.score(ebm), scorer.score(gauss)
    print(f"digits classifier confidence: EBM prior {s_ebm['mean_confidence']:.3f} vs N(0, I) "
          f"{s_gauss['mean_confidence']:.3f}; Frechet {s_ebm['frechet_distance']:.2f} vs "
          f"{s_gauss['frechet_distance']:.2f}")
    assert s_ebm["mean_confidence"] > s_gauss["mean_confidence"]
