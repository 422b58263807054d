"""IWAE on a linear-Gaussian VAE with analytic log p(x): exact at the true posterior, K=1 is the ELBO in
expectation, nondecreasing in K, converges to log p(x); bits/dim convention; any NoiseSpaceBackbone (NVAE) works."""
import math

import pytest
import torch

from core.evaluation.iwae import IWAEConfig, bits_per_dim, iwae, iwae_log_likelihood, prior_log_partition
from core.models import NVAE, NVAEConfig
from core.training.config import load_preset

from test_mlp_vae import SIGMA, D, _linear_vae, _log_px  # the linear-Gaussian VAE with an analytic log p(x)
from test_mlp_vae import _set_exact_posterior as _set_posterior


def _data(n=32):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, D, dtype=torch.float64, generator=g) * 1.2 + torch.tensor([0.3, -0.2, 0.5, 0.1])


def test_exact_posterior_gives_exact_likelihood_for_any_k():
    model, w, b = _linear_vae()
    _set_posterior(model, w, b)
    x = _data()
    for k, chunk in [(1, 1), (7, 3)]:  # every importance weight equals p(x); chunking is exact
        torch.testing.assert_close(iwae_log_likelihood(model, x, k, chunk), _log_px(x, w, b), rtol=0, atol=1e-10)


def test_iwae_is_elbo_at_k1_nondecreasing_in_k_and_converges():
    model, w, b = _linear_vae()
    _set_posterior(model, w, b, mean_shift=0.15, log_scale_shift=math.log(1.3))
    x = _data()
    log_px = _log_px(x, w, b)
    torch.manual_seed(0)

    reps = 300
    with torch.no_grad():
        elbo = torch.stack([model.elbo(x) for _ in range(reps)]).mean(0)  # analytic-KL ELBO, 1 sample
    means = {}
    for k in (1, 10, 100):
        draws = torch.stack([iwae_log_likelihood(model, x, k, chunk_size=64) for _ in range(reps // 3)])
        means[k] = draws.mean().item()
        if k == 1:
            # K = 1 is the ELBO in expectation (Monte-Carlo KL vs analytic KL: same mean)
            se = draws.mean(1).std().item() / math.sqrt(len(draws))
            assert abs(means[1] - elbo.mean().item()) < 5 * se + 5e-3
    gap_elbo = log_px.mean().item() - means[1]
    assert gap_elbo > 0.1  # the widened, shifted encoder leaves a real gap
    assert means[1] < means[10] < means[100] <= log_px.mean().item() + 1e-3

    # K = 20,000 in chunks of 2,500: within 5% of the ELBO gap of the analytic log p(x) at every point
    est = iwae(model, x, IWAEConfig(num_samples=20_000, chunk_size=2_500))
    assert est.dtype == torch.float64 and est.shape == (32,)
    assert (est - log_px).abs().max().item() < 0.05 * gap_elbo
    assert (est - log_px).abs().mean().item() < 0.01


def test_bits_per_dim_convention():
    # a density uniform over the 2^b cells of width 2/(2^b - 1) centred on the levels of [-1, 1] costs b bits/dim
    dims = 3 * 8 * 8
    for bits in (8, 5):
        delta = 2.0 / (2**bits - 1)
        log_px = -dims * math.log(2**bits * delta)
        assert bits_per_dim(log_px, dims, num_bits=bits) == pytest.approx(bits, abs=1e-12)
    # the same model on data scaled to [0, 1] has density 2^D higher and the same bits/dim
    assert bits_per_dim(-100.0 + 10 * math.log(2.0), 10, data_range=1.0) == pytest.approx(bits_per_dim(-100.0, 10))
    assert bits_per_dim(torch.tensor([-100.0, -200.0]), 10).shape == (2,)


def test_runs_on_nvae_backbone_with_multiple_groups():
    torch.manual_seed(0)
    model = NVAE(NVAEConfig(image_size=16)).eval()
    x = torch.rand(3, *model.x_shape()) * 2 - 1
    est = iwae_log_likelihood(model, x, num_samples=4, chunk_size=3)
    assert est.shape == (3,) and torch.isfinite(est).all()
    with torch.no_grad():
        elbo = torch.stack([model.elbo(x).double() for _ in range(4)]).mean(0)
    # both are lower-bound estimates of the same log p(x): same order of magnitude
    assert ((est - elbo).abs() < 0.2 * elbo.abs() + 50).all()


def test_reweighted_prior_is_exact_at_its_exact_posterior_and_log_z_matches():
    """A linear tilt r(z) = exp(t^T z) of the N(0, I) prior is the prior N(t, I) with Z = exp(|t|^2 / 2) (closed form).
    With q(z|x) set to the tilted model's exact posterior every importance weight p(x|z) p(z) r(z) / q(z|x) equals
    Z p_t(x), so the estimate minus log Z is the analytic log p_t(x) for any K; the Monte Carlo log Z agrees with
    |t|^2 / 2 within its standard error."""
    model, w, b = _linear_vae()
    t = torch.tensor([0.8, -0.5], dtype=torch.float64)
    precision = 1.0 + (w * w).sum(dim=0) / SIGMA**2
    _set_posterior(model, w, b, mean_shift=t / precision)  # mean M^-1 (W^T (x - b) / s^2 + t)

    def tilt(tower):
        return tower.groups[0].z.double() @ t

    x = _data()
    log_z = 0.5 * float(t @ t)
    for k, chunk in [(1, 1), (7, 3)]:
        est = iwae_log_likelihood(model, x, k, chunk, log_tilt=tilt) - log_z
        torch.testing.assert_close(est, _log_px(x - w @ t, w, b), rtol=0, atol=1e-10)
    estimate, stderr = prior_log_partition(model, tilt, 20_000, 5_000, torch.Generator().manual_seed(0))
    assert abs(estimate - log_z) < 4 * stderr and stderr < 0.02
