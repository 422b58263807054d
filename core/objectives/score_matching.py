"""Sliced score matching (Song, Garg, Shi and Ermon 2019), the prior's objective in
unnormalized_prior_vae_grbm.md (Sec. 2, Algorithm 1 line 5): fit an energy E to samples z of the aggregate posterior
without its normalizing constant.

With the model score s(z) = -grad E(z) and random projections v (E[v v^T] = I):

    plain:              J(z) = E_v[ v^T (d s / d z) v + 1/2 (v^T s(z))^2 ]        (SSM, Song et al. Eq. 7)
    variance-reduced:   J(z) = E_v[ v^T (d s / d z) v ] + 1/2 ||s(z)||^2          (SSM-VR, Song et al. Eq. 8)

both equal, in expectation over v, the (implicit) score-matching objective tr(ds/dz) + 1/2 ||s||^2 of Hyvarinen.
v^T (ds/dz) v is one Hessian-vector product: grad_z (v^T s(z)) . v, computed with autograd (create_graph, so the
loss is differentiable in the energy's parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VARIANTS = ("vr", "plain")
PROJECTIONS = ("gaussian", "rademacher")


@dataclass
class SSMConfig:
    variant: str = "vr"  # vr: variance-reduced (1/2 ||s||^2 exactly) | plain: 1/2 (v^T s)^2 per projection
    projections: int = 1  # random projections v per sample (Song et al. use 1)
    distribution: str = "gaussian"  # v ~ N(0, I) | rademacher (+-1 entries); both have E[v v^T] = I

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"ssm.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.distribution not in PROJECTIONS:
            raise ValueError(f"ssm.distribution must be one of {PROJECTIONS}, got {self.distribution!r}")
        if self.projections < 1:
            raise ValueError(f"ssm.projections must be >= 1, got {self.projections}")


def draw_projections(shape: tuple[int, ...], config: SSMConfig, generator: torch.Generator | None,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Projection vectors v of shape (projections, *shape) with E[v v^T] = I."""
    size = (config.projections, *shape)
    if config.distribution == "gaussian":
        return torch.randn(size, generator=generator, device=device, dtype=dtype)
    return torch.randint(0, 2, size, generator=generator, device=device).to(dtype) * 2 - 1


def sliced_score_matching(energy: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, v: torch.Tensor,
                          variant: str = "vr") -> torch.Tensor:
    """Per-sample SSM loss (B,) of the energy at samples z (B, D), averaged over the projections v (M, B, D).

    `z` is treated as data (detached); the graph reaches the energy's parameters only.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        s = -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]  # model score, per sample
        total = torch.zeros(z.shape[0], dtype=s.dtype, device=s.device)
        for vm in v:
            sv = (s * vm).sum(-1)  # v^T s(z)
            hvp = torch.autograd.grad(sv.sum(), z, create_graph=True)[0]  # (ds/dz)^T v, per sample
            total = total + (hvp * vm).sum(-1)  # v^T (ds/dz) v
            if variant == "plain":
                total = total + 0.5 * sv**2
        loss = total / v.shape[0]
        if variant == "vr":
            loss = loss + 0.5 * (s**2).sum(-1)
    return loss


def score_matching_objective(score: torch.Tensor, divergence: torch.Tensor) -> torch.Tensor:
    """Hyvarinen's objective tr(ds/dz) + 1/2 ||s||^2 from a closed-form score (B, D) and divergence (B,)."""
    return divergence + 0.5 * (score**2).sum(-1)


__all__ = ["SSMConfig", "draw_projections", "sliced_score_matching", "score_matching_objective", "VARIANTS"]
