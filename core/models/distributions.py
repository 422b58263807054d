"""Diagonal Gaussians: the only distribution family the backbones use.

Every latent group, every approximate posterior and the decoder p(x|z) is a factorized Normal, which is what makes the
noise-space reparameterization of vaebm.md Eq. 8 / App. B exact: z = mu + t * sigma * eps is invertible per element.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)


def soft_clamp(x: torch.Tensor, bound: float = 5.0) -> torch.Tensor:
    """Smoothly squash `x` into (-bound, bound); NVAE bounds mean and log-scale this way for stable early training."""
    return bound * torch.tanh(x / bound)


@dataclass
class DiagNormal:
    """A factorized Normal N(mu, diag(sigma^2)) over tensors of any shape (batch first)."""

    mu: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def from_nvae_params(cls, mu: torch.Tensor, log_sigma: torch.Tensor, min_sigma: float = 1e-2) -> "DiagNormal":
        """NVAE's parameterization: soft-clamped mean and log-scale, sigma floored by `min_sigma`."""
        return cls(soft_clamp(mu), torch.exp(soft_clamp(log_sigma)) + min_sigma)

    def to(self, dtype: torch.dtype) -> "DiagNormal":
        return DiagNormal(self.mu.to(dtype), self.sigma.to(dtype))

    def sample(self, eps: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Reparameterized draw z = mu + t * sigma * eps (vaebm.md App. B); eps ~ N(0, I) if not given."""
        if eps is None:
            eps = torch.randn_like(self.mu)
        return self.mu + temperature * self.sigma * eps

    def noise_of(self, z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Inverse of `sample`: the eps that maps to z."""
        return (z - self.mu) / (temperature * self.sigma)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Element-wise log-density (no reduction)."""
        return -0.5 * ((z - self.mu) / self.sigma) ** 2 - torch.log(self.sigma) - 0.5 * LOG_2PI

    def kl(self, other: "DiagNormal") -> torch.Tensor:
        """Element-wise analytic KL(self || other)."""
        ratio = self.sigma / other.sigma
        diff = (self.mu - other.mu) / other.sigma
        return 0.5 * (diff**2 + ratio**2) - 0.5 - torch.log(ratio)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum all dimensions but the first: per-sample totals of element-wise log-densities."""
    return x.reshape(x.shape[0], -1).sum(dim=1)
