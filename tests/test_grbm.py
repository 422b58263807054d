"""The GRBM prior against independent references: closed-form score and divergence (float64, finite differences),
exact log Z against brute numerical integration, AIS against exact enumeration, Langevin and Gibbs against exact
ancestral samples (and a test that catches the batch-temperature bug), sliced score matching against the closed form
and on a 3-component mixture, and the importance-sampled / classifier likelihood estimators against quadrature and
closed-form KLs."""
from __future__ import annotations

import math

import pytest
import torch

from core.evaluation.grbm_likelihood import (AISConfig, ClassifierConfig, ais_log_partition, importance_estimates,
                                             log_partition, train_ratio_classifier)
from core.models.grbm import (GRBM, GRBMConfig, GRBMParams, exact_log_partition, exact_sample, gibbs_sample,
                              hidden_log_weights_all, langevin_sample, marginal_energy, score, score_divergence,
                              score_jacobian)
from core.objectives.score_matching import SSMConfig, draw_projections, sliced_score_matching
from core.sampling.langevin import LangevinConfig, run_langevin

f64 = torch.float64


def random_params(d: int, h: int, seed: int, w_scale: float = 1.0) -> GRBMParams:
    g = torch.Generator().manual_seed(seed)
    return GRBMParams(mu=torch.randn(d, generator=g, dtype=f64), log_sigma=0.3 * torch.randn(d, generator=g, dtype=f64),
                      W=w_scale * torch.randn(d, h, generator=g, dtype=f64), b=torch.randn(h, generator=g, dtype=f64))


# ------------------------------------------------------------------------------------------- closed forms, float64
def test_score_and_divergence_match_autograd_and_finite_differences():
    p = random_params(5, 7, seed=0)
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=f64)
    # autograd of Eq. 10 against the closed-form score
    zz = z.clone().requires_grad_(True)
    auto = -torch.autograd.grad(marginal_energy(p, zz).sum(), zz)[0]
    torch.testing.assert_close(auto, score(p, z), rtol=0, atol=1e-12)
    # central finite differences (error O(h^2): ~1e-10 relative)
    h = 1e-5
    eye = torch.eye(5, dtype=f64)
    fd = torch.stack([-(marginal_energy(p, z + h * e) - marginal_energy(p, z - h * e)) / (2 * h) for e in eye], -1)
    torch.testing.assert_close(fd, score(p, z), rtol=1e-9, atol=1e-10)
    # finite differences of the closed-form score against the closed-form Jacobian and divergence
    fd_jac = torch.stack([(score(p, z + h * e) - score(p, z - h * e)) / (2 * h) for e in eye], -1)  # (B, D, D)
    torch.testing.assert_close(fd_jac, score_jacobian(p, z), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.diagonal(fd_jac, dim1=1, dim2=2).sum(-1), score_divergence(p, z), rtol=1e-9,
                               atol=1e-10)


@pytest.mark.parametrize("variant", ["plain", "vr"])
def test_sliced_score_matching_equals_its_closed_form(variant):
    p = random_params(4, 6, seed=2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 4, generator=g, dtype=f64)
    v = draw_projections((8, 4), SSMConfig(projections=5), g, dtype=f64)
    loss = sliced_score_matching(lambda t: marginal_energy(p, t), z, v, variant)
    jac, s = score_jacobian(p, z), score(p, z)
    vjv = torch.einsum("mbi,bij,mbj->mb", v, jac, v).mean(0)
    second = (0.5 * torch.einsum("mbi,bi->mb", v, s) ** 2).mean(0) if variant == "plain" else 0.5 * (s**2).sum(-1)
    torch.testing.assert_close(loss, vjv + second, rtol=0, atol=1e-10)
    # and its parameter gradient flows (the prior is trained through it)
    module = GRBM(GRBMConfig(visible=4, hidden=6)).double()
    sliced_score_matching(module.energy, z, v, variant).mean().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in module.parameters())


# --------------------------------------------------------------------------------------------- partition function
def test_exact_log_partition_matches_brute_numerical_integration_2d():
    p = random_params(2, 3, seed=4, w_scale=1.5)
    n, half = 1501, 14.0
    axis = torch.linspace(-half, half, n, dtype=f64)
    zz = torch.cartesian_prod(axis, axis) + p.mu  # grid centered at mu, +-14 (>= 14 sigma for every component)
    cell = (axis[1] - axis[0]) ** 2
    brute = torch.logsumexp(-marginal_energy(p, zz), 0) + torch.log(cell)
    exact = exact_log_partition(p)
    assert abs(float(brute - exact)) < 1e-6, (float(brute), float(exact))


def test_ais_within_three_standard_errors_of_exact_enumeration():
    p = random_params(6, 12, seed=5, w_scale=0.7)
    exact = float(exact_log_partition(p))
    result = ais_log_partition(p, AISConfig(chains=200, betas=1500), torch.Generator().manual_seed(6))
    assert 0 < result.stderr < 0.05, result.stderr  # a meaningful precision, not a huge error bar
    assert abs(result.log_z - exact) < 3 * result.stderr, (result.log_z, result.stderr, exact)
    # with a single intermediate distribution AIS is plain importance sampling from the base: far worse
    crude = ais_log_partition(p, AISConfig(chains=200, betas=2, schedule="linear"), torch.Generator().manual_seed(6))
    assert crude.stderr > 5 * result.stderr
    info = log_partition(p, AISConfig(chains=50, betas=200), torch.Generator().manual_seed(7), exact_max_hidden=20)
    assert info["log_z"] == pytest.approx(exact) and info["log_z_stderr"] == 0.0


# ---------------------------------------------------------------------------------------------------- samplers
def _bimodal_grbm() -> GRBMParams:
    return GRBMParams(mu=torch.tensor([-1.0, 0.5], dtype=f64), log_sigma=torch.log(torch.tensor([0.8, 0.6], dtype=f64)),
                      W=torch.tensor([[1.2, 0.4, -0.3], [0.2, -0.9, 0.6]], dtype=f64),
                      b=torch.tensor([0.3, -0.5, 0.1], dtype=f64))


def _stats(z: torch.Tensor) -> torch.Tensor:
    """Features whose means are compared: first and second moments and two orthant probabilities."""
    z = z.double()
    return torch.stack([z[:, 0], z[:, 1], z[:, 0] ** 2, z[:, 1] ** 2, z[:, 0] * z[:, 1], (z[:, 0] > -0.5).double(),
                        (z[:, 1] > 0.5).double()], 1)


def _agrees(samples: torch.Tensor, exact: torch.Tensor, k: float = 4.5) -> tuple[bool, torch.Tensor]:
    a, b = _stats(samples), _stats(exact)
    se = torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    z = (a.mean(0) - b.mean(0)).abs() / se
    return bool((z < k).all()), z


def test_langevin_and_gibbs_match_exact_samples_and_batch_temperature_is_caught():
    p = _bimodal_grbm()
    exact, _ = exact_sample(p, 40_000, torch.Generator().manual_seed(8))
    chains, steps, s = 4000, 1500, 0.004
    z0 = torch.randn(chains, 2, generator=torch.Generator().manual_seed(9))
    lang = langevin_sample(p, z0, steps, s, torch.Generator().manual_seed(10)).state[0]
    ok, stat = _agrees(lang, exact)
    assert ok, f"Langevin (Eq. 11, eta = 2 s) disagrees with exact samples: |z| = {stat.tolist()}"
    gibbs = gibbs_sample(p.to(torch.float32), z0, 200, torch.Generator().manual_seed(11))
    ok, stat = _agrees(gibbs, exact)
    assert ok, f"block Gibbs disagrees with exact samples: |z| = {stat.tolist()}"
    # The bug of public GRBM code: drift from the batch-mean energy (divided by the batch), noise not. The same
    # statistic must reject it.
    p32 = p.to(torch.float32)
    broken = run_langevin(lambda st: marginal_energy(p32, st[0]) / chains, [z0],
                          LangevinConfig(num_steps=steps, step_size=2 * s), torch.Generator().manual_seed(10))
    ok, _ = _agrees(broken.state[0], exact)
    assert not ok, "the comparison cannot tell a batch-temperature sampler from the right one"


# ------------------------------------------------------------------------------------ SSM on a Gaussian mixture
def test_ssm_fit_to_three_component_mixture_reproduces_weights():
    means = torch.tensor([[-5.0, -5.0], [5.0, -5.0], [0.0, 5.0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    std, n_train, n_samples = 2.5, 4000, 20_000
    g = torch.Generator().manual_seed(0)
    comp = torch.multinomial(weights, n_train, replacement=True, generator=g)
    data = means[comp] + std * torch.randn(n_train, 2, generator=g)
    torch.manual_seed(0)
    grbm = GRBM(GRBMConfig(visible=2, hidden=12, init_weight_std=1.0))
    opt = torch.optim.Adam(grbm.parameters(), lr=0.03)
    steps, cfg = 1500, SSMConfig(variant="vr", projections=1)
    for it in range(steps):
        idx = torch.randint(0, n_train, (512,), generator=g)
        loss = sliced_score_matching(grbm.energy, data[idx], draw_projections((512, 2), cfg, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 0.03 * (1 - (it + 1) / steps)
    samples, _ = exact_sample(grbm.params(detach=True).to(f64), n_samples, torch.Generator().manual_seed(1))
    # The mixture's own responsibilities of the GRBM's exact samples: their means are the component weights.
    logp = torch.distributions.Normal(means.double(), std).log_prob(samples[:, None]).sum(-1) + weights.double().log()
    fitted = torch.softmax(logp, 1).mean(0).float()
    se = torch.sqrt(weights * (1 - weights) * (1 / n_train + 1 / n_samples))
    assert ((fitted - weights).abs() < 4 * se).all(), (fitted.tolist(), se.tolist())


# --------------------------------------------------------------------------------------------- likelihood estimators
def test_importance_sampled_log_likelihood_matches_quadrature():
    """1-D latent, GRBM prior (exact log Z), Gaussian likelihood p(x|z) = N(x; z, tau^2): log p(x) by quadrature."""
    p = GRBMParams(mu=torch.tensor([0.3], dtype=f64), log_sigma=torch.tensor([0.0], dtype=f64),
                   W=torch.tensor([[2.0, -1.5]], dtype=f64), b=torch.tensor([-0.5, 0.2], dtype=f64))
    tau, x = 0.7, torch.tensor([-1.0, 0.4, 2.5], dtype=f64)
    log_z = float(exact_log_partition(p))
    grid = torch.linspace(-15, 15, 30001, dtype=f64)
    lik = torch.distributions.Normal(grid[None], tau).log_prob(x[:, None])
    truth = torch.logsumexp(lik - marginal_energy(p, grid[:, None])[None], 1) + math.log(grid[1] - grid[0]) - log_z
    # a deliberately imperfect Gaussian q(z|x)
    qm, qs = x * 0.8, torch.full_like(x, 1.1)
    g = torch.Generator().manual_seed(0)
    k = 20_000
    z = qm[:, None] + qs[:, None] * torch.randn(3, k, generator=g, dtype=f64)
    lp = torch.distributions.Normal(z, tau).log_prob(x[:, None])
    en = marginal_energy(p, z.reshape(-1, 1)).reshape(3, k)
    lq = torch.distributions.Normal(qm[:, None], qs[:, None]).log_prob(z)
    est = importance_estimates(lp, en, lq, log_z)
    torch.testing.assert_close(est["iwae"], truth, rtol=0, atol=0.01)
    assert (est["elbo"] < truth).all()  # Eq. 2 is a lower bound
    # Eq. 3/4 replace log Z by a per-datum self-normalized estimate: check they are what they claim to be
    torch.testing.assert_close(est["eq4"] - est["iwae"], log_z - est["log_z_self"])


def test_density_ratio_classifier_recovers_kl():
    """Algorithm 2's T(x, z) on a case with a closed form: x ~ N(0, 1), q(z|x) = N(x/2, 0.5^2), p(z) = N(0, 1)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(20_000, 1, generator=g)
    prior = torch.randn(20_000, 1, generator=g)

    def z_post(xb, gen):
        return xb / 2 + 0.5 * torch.randn(xb.shape, generator=gen)

    clf = train_ratio_classifier(x, z_post, prior, ClassifierConfig(hidden=64, steps=1500, batch_size=512, lr=3e-3), g)
    xt = torch.randn(4000, 1, generator=g)
    zt = z_post(xt, g)
    kl_est = float(clf(xt, zt).mean())
    # E_x KL(N(x/2, 1/4) || N(0, 1)) = E[-log 0.5 + (0.25 + x^2/4)/2 - 1/2] = log 2 + 0.25 - 0.5
    kl_true = math.log(2) + (0.25 + 0.25) / 2 - 0.5
    assert abs(kl_est - kl_true) < 0.05, (kl_est, kl_true)


def test_exact_samples_follow_hidden_marginal():
    """Ancestral samples' hidden states have the enumerated marginal (chi-square style bound on each state)."""
    p = _bimodal_grbm()
    n = 50_000
    _, h = exact_sample(p, n, torch.Generator().manual_seed(12))
    idx = (h.long() * (2 ** torch.arange(3))).sum(1)
    freq = torch.bincount(idx, minlength=8).double() / n
    prob = torch.softmax(hidden_log_weights_all(p), 0)
    assert ((freq - prob).abs() < 4.5 * torch.sqrt(prob * (1 - prob) / n) + 1e-9).all()
