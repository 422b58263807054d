"""MLP VAE: a linear-Gaussian special case has an analytic log p(x), which bounds the ELBO and is met by the exact
posterior (vaebm.md Eq. 3)."""
import math

import torch
from torch.distributions import MultivariateNormal, Normal

from core.models import MLPVAE, MLPVAEConfig, NoiseSpaceBackbone

D, K, SIGMA = 4, 2, 0.3


def _linear_vae() -> tuple[MLPVAE, torch.Tensor, torch.Tensor]:
    """x = W z + b + sigma * eps with W = Q diag(s) (orthogonal columns), so the exact posterior is diagonal."""
    torch.manual_seed(1)
    model = MLPVAE(MLPVAEConfig(data_dim=D, latent_dim=K, num_layers=1, homoscedastic_decoder=True)).double()
    q, _ = torch.linalg.qr(torch.randn(D, K, dtype=torch.float64))
    w = q * torch.tensor([1.5, 0.7], dtype=torch.float64)
    b = torch.tensor([0.3, -0.2, 0.5, 0.1], dtype=torch.float64)
    with torch.no_grad():
        model.decoder[0].weight.copy_(w)
        model.decoder[0].bias.copy_(b)
        model.decoder_log_sigma.fill_(math.log(SIGMA))
    return model, w, b


def _set_exact_posterior(model, w, b, mean_shift=0.0, log_scale_shift=0.0):
    """q(z|x) = N(M^-1 W^T (x - b) / s^2, M^-1), M = I + W^T W / s^2 (diagonal here); the shifts move it off the exact
    posterior (a realistic encoder)."""
    m_diag = 1.0 + (w * w).sum(dim=0) / SIGMA**2
    a = (w.T / SIGMA**2) / m_diag[:, None]
    with torch.no_grad():
        enc = model.encoder[0]
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:K] = a
        enc.bias[:K] = -a @ b + mean_shift
        enc.bias[K:] = -0.5 * torch.log(m_diag) + log_scale_shift


def _log_px(x, w, b):
    cov = w @ w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
    return MultivariateNormal(b, covariance_matrix=cov).log_prob(x)


def _analytic_elbo(model, x, w, b):
    """E_q[log p(x|z)] - KL(q || N(0, I)) in closed form for the linear-Gaussian model."""
    q = model.posterior_params(x)
    resid = x - b - q.mu @ w.T
    trace = ((w * w) * q.sigma[:, None, :] ** 2).sum(dim=(1, 2))
    recon = -0.5 * ((resid**2).sum(1) + trace) / SIGMA**2 - D * math.log(SIGMA) - 0.5 * D * math.log(2 * math.pi)
    kl = torch.distributions.kl_divergence(Normal(q.mu, q.sigma), Normal(0.0, 1.0)).sum(1)
    return recon - kl


def test_elbo_bounds_exact_likelihood_and_gap_closes_at_exact_posterior():
    model, w, b = _linear_vae()
    assert isinstance(model, NoiseSpaceBackbone)
    x = torch.randn(64, D, dtype=torch.float64) * 1.5 + b
    log_px = _log_px(x, w, b)

    # an arbitrary encoder: the analytic ELBO is strictly below log p(x), and the model's one-sample ELBO averages to it
    analytic = _analytic_elbo(model, x, w, b)
    assert (analytic < log_px - 1e-3).all()
    with torch.no_grad():
        draws = torch.stack([model.elbo(x) for _ in range(4000)])
    standard_error = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - analytic).abs() < 5 * standard_error).all()

    # exact posterior: log p(x|z) + log p(z) - log q(z|x) = log p(x) for every z, and ELBO = log p(x)
    _set_exact_posterior(model, w, b)
    tower = model.posterior(x)
    pointwise = model.log_p_x_given_z(tower, x) + tower.log_p_z() - tower.log_q_z()
    torch.testing.assert_close(pointwise, log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(_analytic_elbo(model, x, w, b), log_px, rtol=0, atol=1e-10)


def test_noise_space_round_trip_and_paper_architecture():
    model = MLPVAE(MLPVAEConfig()).double()
    linears = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and linears[0].in_features == 20 and linears[1].in_features == 256
    eps_x, eps_z = model.sample_noise(5)
    eps_x, eps_z = eps_x.double(), [e.double() for e in eps_z]
    x, tower = model.generate(eps_z, eps_x, temperature=0.8)
    assert x.shape == (5, 2) and tower.z[0].shape == (5, 20) and tower.groups[0].context.shape == (5, 0)
    back_x, back_z = model.inverse(x, tower.z, temperature=0.8)
    torch.testing.assert_close(back_x, eps_x, rtol=0, atol=1e-10)
    torch.testing.assert_close(back_z[0], eps_z[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(model.log_p_z(tower.z), Normal(0.0, 1.0).log_prob(tower.z[0]).sum(1))
