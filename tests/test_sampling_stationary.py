"""The ε-space targets sample the right law: linear-Gaussian VAE + quadratic energy, checked against closed forms.

For a Gaussian target exp(-½(s-m)ᵀP(s-m)) the unadjusted Langevin chain s' = s - (η/2)P(s-m) + √η ω (vaebm.md
Eq. 2) is itself Gaussian with stationary mean m and covariance Σ solving Σ = MΣMᵀ + ηI, M = I - (η/2)P. Comparing
against that (not against P⁻¹) removes the O(η) discretisation bias, so the tolerance is Monte-Carlo error only.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn

from core.models.distributions import DiagNormal
from core.models.interface import LatentGroup, TowerPass
from core.models.mlp_vae import MLPVAE, MLPVAEConfig
from core.methods.potentials import join_state, make_vaebm_potential
from core.sampling import LangevinConfig, run_langevin

CHAINS = 20000
STEPS = 150
ETA = 0.3

A = torch.tensor([[1.0, -0.6], [0.4, 0.9]])
B_X = torch.tensor([0.3, -0.2])
MU_Z = torch.tensor([0.5, -1.0])
SIGMA_Z = torch.tensor([0.8, 1.3])
LOG_SIGMA_X = torch.tensor([-0.7, -0.4])
W_LOG_SIGMA = torch.tensor([[0.5, -0.3], [0.8, 0.4]])  # heteroscedastic decoder: log σ_x = W z + c
Q = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
C = torch.tensor([1.5, -1.0])


class LinearGaussianVAE(nn.Module):
    """z = μ_z + t·σ_z·ε_z, x = A z + b + σ_x(z)·ε_x with log σ_x(z) = W z + c (W = 0: homoscedastic)."""

    def __init__(self, heteroscedastic: bool):
        super().__init__()
        self.w = nn.Parameter(W_LOG_SIGMA.clone() if heteroscedastic else torch.zeros(2, 2))
        self.a = nn.Parameter(A.clone())

    def generate(self, eps_z, eps_x, temperature=1.0):
        (e,) = eps_z
        prior = DiagNormal(MU_Z.expand_as(e), SIGMA_Z.expand_as(e))
        z = prior.sample(e, temperature)
        x_dist = DiagNormal(z @ self.a.T + B_X, torch.exp(z @ self.w.T + LOG_SIGMA_X))
        return x_dist.sample(eps_x), TowerPass([LatentGroup(z, prior, e[:, :0])], x_dist)


def quadratic_energy(x: torch.Tensor) -> torch.Tensor:
    d = x - C
    return 0.5 * ((d @ Q) * d).sum(1)


def gaussian_target(j_energy: np.ndarray, x0: np.ndarray, linear: np.ndarray | None = None):
    """Mean and precision of exp(-E(J ε + x0) - ½‖ε‖² - linearᵀε) for the quadratic energy."""
    q, c = Q.double().numpy(), C.double().numpy()
    prec = np.eye(j_energy.shape[1]) + j_energy.T @ q @ j_energy
    rhs = j_energy.T @ q @ (c - x0)
    if linear is not None:
        rhs = rhs - linear
    return np.linalg.solve(prec, rhs), prec


def ula_covariance(prec: np.ndarray, eta: float) -> np.ndarray:
    m = np.eye(len(prec)) - 0.5 * eta * prec
    return scipy.linalg.solve_discrete_lyapunov(m, eta * np.eye(len(prec)))


def chains(backbone, mode: str, temperature: float = 1.0, use_mean: bool = False, seed: int = 0) -> np.ndarray:
    potential = make_vaebm_potential(backbone, quadratic_energy, mode=mode, temperature=temperature,
                                     use_mean=use_mean)
    g = torch.Generator().manual_seed(seed)
    init = join_state(torch.randn(CHAINS, 2, generator=g), [torch.randn(CHAINS, 2, generator=g)])
    out = run_langevin(potential, init, LangevinConfig(num_steps=STEPS, step_size=ETA), generator=g)
    assert out.num_nonfinite == 0 and all(s.dtype == torch.float32 for s in out.state)
    return torch.cat(out.state, dim=1).double().numpy()  # columns: eps_x (2), eps_z (2)


def assert_moments(samples: np.ndarray, mean: np.ndarray, cov: np.ndarray, z: float = 5.0) -> None:
    n = len(samples)
    emp_mean, emp_cov = samples.mean(0), np.cov(samples.T)
    mean_se = np.sqrt(np.diag(cov) / n)
    np.testing.assert_array_less(np.abs(emp_mean - mean), z * mean_se)
    cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)  # Gaussian sampling error of Σ_ij
    np.testing.assert_array_less(np.abs(emp_cov - cov), z * cov_se)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_exact_target_matches_tilted_gaussian(temperature):
    backbone = LinearGaussianVAE(heteroscedastic=False)
    sz = temperature * SIGMA_Z.double().numpy()
    j = np.concatenate([np.diag(np.exp(LOG_SIGMA_X.double().numpy())), A.double().numpy() * sz], axis=1)
    x0 = A.double().numpy() @ MU_Z.double().numpy() + B_X.double().numpy()
    mean, prec = gaussian_target(j, x0)
    samples = chains(backbone, "exact", temperature=temperature)
    assert_moments(samples, mean, ula_covariance(prec, ETA))
    # The comparison is sharp: the continuous-time covariance P⁻¹ differs from the ULA one by more than MC error.
    with pytest.raises(AssertionError):
        assert_moments(samples, mean, np.linalg.inv(prec))


def test_exact_target_on_mlp_vae_backbone():
    """The real MLP VAE (num_layers=1, homoscedastic decoder) is a linear-Gaussian VAE with μ_z = 0, σ_z = 1."""
    vae = MLPVAE(MLPVAEConfig(data_dim=2, latent_dim=2, num_layers=1, homoscedastic_decoder=True))
    with torch.no_grad():
        vae.decoder[0].weight.copy_(A)
        vae.decoder[0].bias.copy_(B_X)
        vae.decoder_log_sigma.copy_(LOG_SIGMA_X)
    j = np.concatenate([np.diag(np.exp(LOG_SIGMA_X.double().numpy())), A.double().numpy()], axis=1)
    mean, prec = gaussian_target(j, B_X.double().numpy())
    assert_moments(chains(vae, "exact", seed=1), mean, ula_covariance(prec, ETA))


def test_joint_target_shifts_by_log_sigma_terms_and_exact_does_not():
    """Heteroscedastic decoder, energy on the decoder mean (so the target stays Gaussian in ε).

    joint adds −log p(z) − log p(x|z) = ½‖ε‖² + Σ log σ_z + 1ᵀ(W z + c) + const, i.e. the linear term
    (σ_z ∘ Wᵀ1)ᵀ ε_z, which moves the mean by −P⁻¹ g; exact mode has no such term.
    """
    backbone = LinearGaussianVAE(heteroscedastic=True)
    sz = SIGMA_Z.double().numpy()
    j = np.concatenate([np.zeros((2, 2)), A.double().numpy() * sz], axis=1)  # E sees μ_x(z): no ε_x dependence
    x0 = A.double().numpy() @ MU_Z.double().numpy() + B_X.double().numpy()
    g = np.concatenate([np.zeros(2), sz * W_LOG_SIGMA.double().numpy().sum(0)])
    mean_exact, prec = gaussian_target(j, x0)
    mean_joint, _ = gaussian_target(j, x0, linear=g)
    cov = ula_covariance(prec, ETA)
    exact = chains(backbone, "exact", use_mean=True, seed=2)
    joint = chains(backbone, "joint", use_mean=True, seed=3)
    assert_moments(exact, mean_exact, cov)
    assert_moments(joint, mean_joint, cov)
    shift = np.abs(mean_joint - mean_exact)
    assert shift.max() > 50 * np.sqrt(cov.diagonal().max() / CHAINS)  # the shift is far outside MC error
    with pytest.raises(AssertionError):
        assert_moments(joint, mean_exact, cov)
