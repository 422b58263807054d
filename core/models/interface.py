"""The noise-space (epsilon) interface that every stage-2 method uses (vaebm.md Eq. 8, App. B; DESIGN.md "Seams").

A backbone exposes its generative map as deterministic functions of standard-normal noise:
    z = T_z(eps_z)            latent groups, coarsest first, each with its prior N(mu_l, sigma_l) and context
    x = T_x(z, eps_x)         decoder mean + sigma * eps_x
and their inverse (x, z) -> (eps_x, eps_z). VAEBM's Langevin target, NCP-VAE's reweighting, the joint latent EBM
prior and the GRBM prior all use only this protocol, so the NVAE and the 2-D MLP VAE are interchangeable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from core.models.distributions import DiagNormal, sum_except_batch


@dataclass
class LatentGroup:
    """One latent group as produced by a walk of the decoder tower."""

    z: torch.Tensor  # the group's value
    prior: DiagNormal  # p(z_l | z_<l) evaluated at the decoder state before the group
    context: torch.Tensor  # decoder state before the group (input of the prior's sampler)
    posterior: DiagNormal | None = None  # q(z_l | x, z_<l) when the walk ran with an encoder (its Normal part)
    # q's Normal draw before flow cells shifted it into z (NVAE num_nf > 0); None: z is the Normal draw itself.
    z_q: torch.Tensor | None = None

    @property
    def q_draw(self) -> torch.Tensor:
        """The value of the group under q's Normal part: z, or the pre-flow draw when q ends with flow cells."""
        return self.z if self.z_q is None else self.z_q


@dataclass
class TowerPass:
    """Result of one walk through the generative tower."""

    groups: list[LatentGroup]
    x_dist: DiagNormal  # p(x | z)

    def to(self, dtype: torch.dtype) -> "TowerPass":
        """The same pass with every tensor cast (objectives run in fp32 whatever precision the network used)."""
        groups = [LatentGroup(g.z.to(dtype), g.prior.to(dtype), g.context.to(dtype),
                              None if g.posterior is None else g.posterior.to(dtype),
                              None if g.z_q is None else g.z_q.to(dtype)) for g in self.groups]
        return TowerPass(groups=groups, x_dist=self.x_dist.to(dtype))

    @property
    def z(self) -> list[torch.Tensor]:
        return [g.z for g in self.groups]

    def log_p_z(self) -> torch.Tensor:
        """Per-sample log p(z) = sum_l log p(z_l | z_<l)."""
        return sum(sum_except_batch(g.prior.log_prob(g.z)) for g in self.groups)

    def log_q_z(self) -> torch.Tensor:
        """Per-sample log q(z|x) = sum_l log q(z_l | x, z_<l) (needs a walk with an encoder). Flow cells are
        shift-only (log|det| = 0), so q at the flowed z is the Normal part's density at the pre-flow draw."""
        return sum(sum_except_batch(g.posterior.log_prob(g.q_draw)) for g in self.groups)

    def kl_per_group(self) -> torch.Tensor:
        """(batch, groups) KL(q(z_l|x,z_<l) || p(z_l|z_<l)) at the sampled z_<l (NVAE Eq. 2): analytic for a Normal
        q; with flow cells the one-sample estimate log q(z_l|x, z_<l) - log p(z_l|z_<l) at the sample, as NVAE."""
        return torch.stack([sum_except_batch(g.posterior.kl(g.prior) if g.z_q is None else
                                             g.posterior.log_prob(g.z_q) - g.prior.log_prob(g.z))
                            for g in self.groups], dim=1)


@runtime_checkable
class NoiseSpaceBackbone(Protocol):
    """What stage-2 code may call on a backbone. Inputs x are in the model's data space ([-1, 1] for images)."""

    def latent_shapes(self) -> list[tuple[int, ...]]: ...

    def x_shape(self) -> tuple[int, ...]: ...

    def sample_noise(self, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def T_z(self, eps_z: list[torch.Tensor], temperature: float = 1.0) -> TowerPass: ...

    def T_x(self, z: list[torch.Tensor], eps_x: torch.Tensor) -> torch.Tensor: ...

    def generate(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor,
                 temperature: float = 1.0) -> tuple[torch.Tensor, TowerPass]: ...

    def inverse(self, x: torch.Tensor, z: list[torch.Tensor],
                temperature: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def posterior(self, x: torch.Tensor) -> TowerPass: ...

    def log_p_z(self, z: list[torch.Tensor]) -> torch.Tensor: ...

    def log_q_z(self, z: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor: ...

    def elbo(self, x: torch.Tensor) -> torch.Tensor: ...
