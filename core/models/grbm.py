"""Gaussian-Bernoulli RBM: the unnormalized latent prior of unnormalized_prior_vae_grbm.md (Sec. 2, Eq. 10).

Joint energy over visible z in R^D and hidden h in {0, 1}^H (per-visible mean mu and std sigma, weights W (D, H),
hidden bias b):

    E(z, h) = 1/2 ||(z - mu) / sigma||^2 - (z / sigma^2)^T W h - b^T h

Summing h out gives the marginal energy of Eq. 10,

    E(z) = 1/2 ||(z - mu) / sigma||^2 - softplus(W^T (z / sigma^2) + b)^T 1,

with the closed-form score s(z) = -grad E(z) = -(z - mu) / sigma^2 + W sigmoid(b + W^T z / sigma^2) / sigma^2 and
conditionals h_j | z ~ Bernoulli(sigmoid(b_j + w_j^T z / sigma^2)), z | h ~ N(mu + W h, diag sigma^2). Integrating z
out instead gives the hidden marginal

    log p~(h) = b^T h + sum_i ((W h)_i^2 + 2 mu_i (W h)_i) / (2 sigma_i^2) + D/2 log 2 pi + sum_i log sigma_i,

so for small H the partition function is an exact log-sum-exp over the 2^H hidden states (`exact_log_partition`) and
exact samples are ancestral (h from that categorical marginal, then z | h): the references the Monte-Carlo
estimators (core/evaluation/grbm_likelihood.py) and samplers are tested against.

Langevin (Eq. 11: z <- z - s grad E + sqrt(2 s) w) runs through the project's one implementation
(core/sampling/langevin.py: drift -(eta/2) grad U, noise sqrt(eta) w), so eta = 2 s: `langevin_sample`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.sampling.langevin import LangevinConfig, LangevinResult, run_langevin

# Hidden states per chunk when enumerating all 2^H of them (memory: chunk x max(D, H) floats).
_ENUM_CHUNK = 1 << 14
MAX_EXACT_HIDDEN = 24  # enumeration beyond this is refused (2^24 states already take minutes)


@dataclass
class GRBMConfig:
    visible: int = 64  # D: latent dimensions modelled (the VAE's latent size)
    hidden: int = 128  # H: Bernoulli hidden units (the paper: 128 for MNIST and CIFAR-10)
    init_weight_std: float = 0.01  # W ~ N(0, init_weight_std^2) at initialization; mu = 0, sigma = 1, b = 0
    min_log_sigma: float = -7.0  # log sigma is clamped below at this value (a collapsing sigma makes E explode)

    def validate(self) -> None:
        if self.visible < 1 or self.hidden < 1:
            raise ValueError(f"grbm.visible and grbm.hidden must be >= 1, got {self.visible}, {self.hidden}")
        if self.init_weight_std < 0:
            raise ValueError("grbm.init_weight_std must be >= 0")


@dataclass
class GRBMParams:
    """Plain tensors of a GRBM (possibly detached or float64 copies): what the math below works on."""

    mu: torch.Tensor  # (D,)
    log_sigma: torch.Tensor  # (D,)
    W: torch.Tensor  # (D, H)
    b: torch.Tensor  # (H,)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(2.0 * self.log_sigma)

    def to(self, dtype: torch.dtype) -> "GRBMParams":
        return GRBMParams(self.mu.to(dtype), self.log_sigma.to(dtype), self.W.to(dtype), self.b.to(dtype))

    def detach(self) -> "GRBMParams":
        return GRBMParams(self.mu.detach(), self.log_sigma.detach(), self.W.detach(), self.b.detach())

    def scaled(self, beta: float) -> "GRBMParams":
        """The GRBM with W and b multiplied by beta (AIS's intermediate distributions; beta = 0: N(mu, sigma^2))."""
        return GRBMParams(self.mu, self.log_sigma, beta * self.W, beta * self.b)


# ---------------------------------------------------------------------------------------------- closed forms
def hidden_preactivation(p: GRBMParams, z: torch.Tensor) -> torch.Tensor:
    """a(z) = b + W^T (z / sigma^2): (B, H)."""
    return (z / p.var) @ p.W + p.b


def marginal_energy(p: GRBMParams, z: torch.Tensor) -> torch.Tensor:
    """E(z) of Eq. 10, per sample: (B,)."""
    quad = 0.5 * (((z - p.mu) / torch.exp(p.log_sigma)) ** 2).sum(-1)
    return quad - F.softplus(hidden_preactivation(p, z)).sum(-1)


def score(p: GRBMParams, z: torch.Tensor) -> torch.Tensor:
    """s(z) = -grad E(z) = -(z - mu)/sigma^2 + W sigmoid(a(z)) / sigma^2 (closed form): (B, D)."""
    return (-(z - p.mu) + torch.sigmoid(hidden_preactivation(p, z)) @ p.W.T) / p.var


def score_jacobian(p: GRBMParams, z: torch.Tensor) -> torch.Tensor:
    """d s / d z = -diag(1/sigma^2) + diag(1/sigma^2) W diag(sig'(a)) W^T diag(1/sigma^2): (B, D, D)."""
    sig = torch.sigmoid(hidden_preactivation(p, z))
    inv = 1.0 / p.var
    Ws = p.W * inv[:, None]  # diag(1/sigma^2) W
    jac = torch.einsum("ih,bh,jh->bij", Ws, sig * (1 - sig), Ws)
    return jac - torch.diag_embed(inv.expand_as(z))


def score_divergence(p: GRBMParams, z: torch.Tensor) -> torch.Tensor:
    """tr(d s / d z) = sum_i [-1/sigma_i^2 + sum_j W_ij^2 sig'(a_j) / sigma_i^4]: (B,)."""
    sig = torch.sigmoid(hidden_preactivation(p, z))
    inv = 1.0 / p.var
    return (sig * (1 - sig)) @ ((p.W**2) * (inv**2)[:, None]).sum(0) - inv.sum()


def hidden_log_weight(p: GRBMParams, h: torch.Tensor) -> torch.Tensor:
    """log of the unnormalized hidden marginal, int exp(-E(z, h)) dz, for h (N, H) in {0, 1}: (N,)."""
    Wh = h @ p.W.T  # (N, D)
    const = 0.5 * p.mu.numel() * math.log(2 * math.pi) + p.log_sigma.sum()
    return h @ p.b + ((Wh**2 + 2 * p.mu * Wh) / (2 * p.var)).sum(-1) + const


def all_hidden_states(hidden: int, start: int, stop: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """Hidden configurations start..stop-1 in binary (bit j of the index is h_j): (stop - start, H)."""
    idx = torch.arange(start, stop, device=device)
    bits = torch.arange(hidden, device=device)
    return ((idx[:, None] >> bits) & 1).to(dtype)


def hidden_log_weights_all(p: GRBMParams) -> torch.Tensor:
    """log p~(h) for all 2^H hidden states in index order: (2^H,)."""
    H = p.W.shape[1]
    if H > MAX_EXACT_HIDDEN:
        raise ValueError(f"exact enumeration over 2^{H} hidden states is refused (H > {MAX_EXACT_HIDDEN}); "
                         f"use annealed importance sampling")
    total = 1 << H
    return torch.cat([hidden_log_weight(p, all_hidden_states(H, s, min(s + _ENUM_CHUNK, total), p.W.dtype,
                                                             p.W.device))
                      for s in range(0, total, _ENUM_CHUNK)])


def exact_log_partition(p: GRBMParams) -> torch.Tensor:
    """log Z = log sum_h int exp(-E(z, h)) dz, exact by enumerating the 2^H hidden states (small H only)."""
    return torch.logsumexp(hidden_log_weights_all(p), 0)


def exact_sample(p: GRBMParams, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n exact (ancestral) samples (z, h): h from its exact marginal over the 2^H states, then z | h (small H)."""
    logw = hidden_log_weights_all(p)
    probs = torch.softmax(logw.double(), 0)
    idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    h = ((idx[:, None] >> torch.arange(p.W.shape[1], device=idx.device)) & 1).to(p.W.dtype)
    return sample_visible(p, h, generator), h


def sample_hidden(p: GRBMParams, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """h ~ p(h | z): independent Bernoulli(sigmoid(a(z)))."""
    prob = torch.sigmoid(hidden_preactivation(p, z))
    return (torch.rand(prob.shape, generator=generator, device=prob.device, dtype=prob.dtype) < prob).to(z.dtype)


def sample_visible(p: GRBMParams, h: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z ~ p(z | h) = N(mu + W h, diag sigma^2)."""
    mean = p.mu + h @ p.W.T
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(p.log_sigma) * noise


def gibbs_sample(p: GRBMParams, z: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`steps` sweeps of block Gibbs sampling (h | z Bernoulli, then z | h Gaussian) from z."""
    for _ in range(steps):
        z = sample_visible(p, sample_hidden(p, z, generator), generator)
    return z


def langevin_sample(p: GRBMParams, z0: torch.Tensor, steps: int, step_size: float,
                    generator: torch.Generator | None = None, record_every: int = 0) -> LangevinResult:
    """Langevin on E(z) (Eq. 11: z <- z - s grad E(z) + sqrt(2 s) w) through core.sampling.langevin.run_langevin.

    run_langevin's update is z <- z - (eta/2) grad U + sqrt(eta) w with per-sample drift (the gradient of the
    summed energies, never of their mean: a batch-mean energy would divide the drift by the batch size and sample
    at temperature ~ batch size). With U = E, eta = 2 s reproduces Eq. 11 exactly.
    """
    params = p.detach().to(torch.float32)
    config = LangevinConfig(num_steps=steps, step_size=2.0 * step_size, record_every=record_every)
    return run_langevin(lambda state: marginal_energy(params, state[0]), [z0], config, generator=generator)


# ---------------------------------------------------------------------------------------------- the module
class GRBM(torch.nn.Module):
    """The trainable GRBM prior: parameters mu, log sigma, W, b (Eq. 10)."""

    def __init__(self, config: GRBMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.mu = torch.nn.Parameter(torch.zeros(config.visible))
        self.log_sigma = torch.nn.Parameter(torch.zeros(config.visible))
        self.W = torch.nn.Parameter(torch.randn(config.visible, config.hidden) * config.init_weight_std)
        self.b = torch.nn.Parameter(torch.zeros(config.hidden))

    def params(self, detach: bool = False) -> GRBMParams:
        """The parameters as a GRBMParams (log sigma clamped at min_log_sigma); `detach`: no gradients to them."""
        log_sigma = self.log_sigma.clamp(min=self.config.min_log_sigma)
        p = GRBMParams(self.mu, log_sigma, self.W, self.b)
        return p.detach() if detach else p

    def energy(self, z: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """E(z) per sample (Eq. 10); `detach_params`: gradients flow to z only (the VAE's update, Algorithm 1)."""
        return marginal_energy(self.params(detach_params), z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.energy(z)


__all__ = ["GRBM", "GRBMConfig", "GRBMParams", "marginal_energy", "score", "score_jacobian", "score_divergence",
           "hidden_preactivation", "hidden_log_weight", "hidden_log_weights_all", "all_hidden_states",
           "exact_log_partition", "exact_sample", "sample_hidden", "sample_visible", "gibbs_sample",
           "langevin_sample", "MAX_EXACT_HIDDEN"]
