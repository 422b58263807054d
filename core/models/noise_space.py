"""The epsilon interface implemented once, on top of a backbone's single tower walk.

A backbone implements `walk(batch, choose_z, x)`: run the top-down tower, at every group compute the prior (and the
posterior if `x` is given), ask `choose_z` for the group's value, and return the `TowerPass`. Sampling from the prior,
encoding, teacher-forcing given z, and inverting to noise are all that one walk with a different `choose_z`.
"""
from __future__ import annotations

import abc
from typing import Callable

import torch
import torch.nn as nn

from core.models.distributions import DiagNormal, sum_except_batch
from core.models.interface import TowerPass

ChooseZ = Callable[[int, DiagNormal, "DiagNormal | None"], torch.Tensor]


class NoiseSpaceVAE(nn.Module, abc.ABC):
    """Base class of the backbones: implements `core.models.interface.NoiseSpaceBackbone` from `walk`."""

    @abc.abstractmethod
    def walk(self, batch: int, choose_z: ChooseZ, x: torch.Tensor | None = None) -> TowerPass:
        """One pass through the generative tower; encodes `x` for posteriors when given."""

    @abc.abstractmethod
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Per-group latent shape (without batch), top group first."""

    @abc.abstractmethod
    def x_shape(self) -> tuple[int, ...]:
        """Data shape without batch."""

    def spectral_penalty(self) -> torch.Tensor:
        """The stage-1 spectral regularizer (NVAE Sec. 3.2); backbones without one contribute 0."""
        return torch.zeros((), device=self._like().device)

    def batchnorm_penalty(self) -> torch.Tensor:
        """The stage-1 batch-norm scale regularizer (NVAE Sec. 3.2); backbones without BN contribute 0."""
        return torch.zeros((), device=self._like().device)

    def forward(self, x: torch.Tensor) -> TowerPass:
        """The training pass: encode x and sample z ~ q(z|x) (what the DeepSpeed engine calls)."""
        return self.posterior(x)

    def _like(self) -> torch.Tensor:
        return next(self.parameters())

    def sample_noise(self, batch: int, generator: torch.Generator | None = None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fresh (eps_x, eps_z) ~ N(0, I) in fp32 (Langevin state is kept in fp32; DESIGN.md)."""
        device = device or self._like().device
        eps_z = [torch.randn((batch, *s), generator=generator, device=device) for s in self.latent_shapes()]
        eps_x = torch.randn((batch, *self.x_shape()), generator=generator, device=device)
        return eps_x, eps_z

    def T_z(self, eps_z: list[torch.Tensor], temperature: float = 1.0) -> TowerPass:
        """z = T_z(eps_z): z_l = mu_l(z_<l) + t * sigma_l(z_<l) * eps_l (vaebm.md Eq. 8)."""
        return self.walk(eps_z[0].shape[0], lambda i, prior, _: prior.sample(eps_z[i], temperature))

    def T_x(self, z: list[torch.Tensor], eps_x: torch.Tensor) -> torch.Tensor:
        """x = T_x(z, eps_x) = mu_x(z) + sigma_x(z) * eps_x (vaebm.md Eq. 8)."""
        return self.decode(z).sample(eps_x)

    def decode(self, z: list[torch.Tensor]) -> DiagNormal:
        """p(x | z) for given latent groups."""
        return self.walk(z[0].shape[0], lambda i, _p, _q: z[i]).x_dist

    def generate(self, eps_z: list[torch.Tensor], eps_x: torch.Tensor,
                 temperature: float = 1.0) -> tuple[torch.Tensor, TowerPass]:
        """T(eps_x, eps_z) = (x, z) in one tower walk (vaebm.md Eq. 11): the hot path of Langevin sampling."""
        tower = self.T_z(eps_z, temperature)
        return tower.x_dist.sample(eps_x), tower

    def inverse(self, x: torch.Tensor, z: list[torch.Tensor],
                temperature: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """T^{-1}(x, z) = (eps_x, eps_z) (vaebm.md Eq. 12)."""
        tower = self.walk(x.shape[0], lambda i, _p, _q: z[i])
        eps_z = [g.prior.noise_of(g.z, temperature) for g in tower.groups]
        return tower.x_dist.noise_of(x), eps_z

    def posterior(self, x: torch.Tensor, eps_z: list[torch.Tensor] | None = None) -> TowerPass:
        """Encode x and draw z ~ q(z|x) group by group (reparameterized; `eps_z` fixes the noise of q's Normal part,
        z_q = mu_q + sigma_q * eps, which a backbone with flow cells then shifts into z)."""
        def choose(i: int, _prior: DiagNormal, post: DiagNormal | None) -> torch.Tensor:
            return post.sample(None if eps_z is None else eps_z[i])
        return self.walk(x.shape[0], choose, x=x)

    def log_p_z(self, z: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample log p(z) of given groups."""
        return self.walk(z[0].shape[0], lambda i, _p, _q: z[i]).log_p_z()

    def log_q_z(self, z: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-sample log q(z | x) of given groups."""
        return self.walk(x.shape[0], lambda i, _p, _q: z[i], x=x).log_q_z()

    def log_p_x_given_z(self, tower: TowerPass, x: torch.Tensor) -> torch.Tensor:
        """Per-sample log p(x | z) under the Gaussian decoder."""
        return sum_except_batch(tower.x_dist.log_prob(x))

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)) (vaebm.md Eq. 3), one-sample estimate; the KL is
        analytic per group, or log q - log p at the sample when q has flow cells (`TowerPass.kl_per_group`)."""
        tower = self.posterior(x)
        return self.log_p_x_given_z(tower, x) - tower.kl_per_group().sum(dim=1)
