"""MLP VAE for low-dimensional data (the papers' 25-Gaussians experiment: vaebm.md Sec. 5.4, ncpvae_appendix.md App. J).

One latent group z ~ N(0, I), Gaussian encoder and decoder with `num_layers` fully connected layers each. It
implements the same epsilon interface as the NVAE, so every stage-2 method runs on 2-D data unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from core.models.distributions import DiagNormal
from core.models.interface import LatentGroup, TowerPass
from core.models.noise_space import ChooseZ, NoiseSpaceVAE


@dataclass
class MLPVAEConfig:
    data_dim: int = 2  # dimension of x
    latent_dim: int = 20  # dimension of z (20 in the papers)
    hidden: int = 256  # width of every hidden layer (256 in the papers)
    num_layers: int = 4  # fully connected layers per network; 1 = affine maps (linear-Gaussian VAE)
    homoscedastic_decoder: bool = False  # sigma_x a learned constant instead of a function of z
    min_log_sigma: float = -9.0  # clamp of every log-scale: keeps sigma > 1.2e-4 so log-densities stay finite

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.data_dim < 1 or self.latent_dim < 1 or self.hidden < 1:
            raise ValueError("MLPVAEConfig: dims, hidden and num_layers must be >= 1")


def _mlp(n_in: int, n_out: int, hidden: int, num_layers: int) -> nn.Sequential:
    if num_layers == 1:
        return nn.Sequential(nn.Linear(n_in, n_out))
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.SiLU()]
    for _ in range(num_layers - 2):
        layers += [nn.Linear(hidden, hidden), nn.SiLU()]
    layers.append(nn.Linear(hidden, n_out))
    return nn.Sequential(*layers)


class MLPVAE(NoiseSpaceVAE):
    def __init__(self, config: MLPVAEConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = _mlp(c.data_dim, 2 * c.latent_dim, c.hidden, c.num_layers)
        if c.homoscedastic_decoder:
            self.decoder = _mlp(c.latent_dim, c.data_dim, c.hidden, c.num_layers)
            self.decoder_log_sigma = nn.Parameter(torch.zeros(c.data_dim))
        else:
            self.decoder = _mlp(c.latent_dim, 2 * c.data_dim, c.hidden, c.num_layers)

    def latent_shapes(self) -> list[tuple[int]]:
        return [(self.config.latent_dim,)]

    def x_shape(self) -> tuple[int]:
        return (self.config.data_dim,)

    def _normal(self, mu: torch.Tensor, log_sigma: torch.Tensor) -> DiagNormal:
        return DiagNormal(mu, torch.exp(log_sigma.clamp(min=self.config.min_log_sigma)))

    def posterior_params(self, x: torch.Tensor) -> DiagNormal:
        mu, log_sigma = self.encoder(x).chunk(2, dim=1)
        return self._normal(mu, log_sigma)

    def decoder_params(self, z: torch.Tensor) -> DiagNormal:
        out = self.decoder(z)
        if self.config.homoscedastic_decoder:
            return self._normal(out, self.decoder_log_sigma.expand_as(out))
        mu, log_sigma = out.chunk(2, dim=1)
        return self._normal(mu, log_sigma)

    def walk(self, batch: int, choose_z: ChooseZ, x: torch.Tensor | None = None) -> TowerPass:
        like = self._like()
        zeros = torch.zeros((batch, self.config.latent_dim), dtype=like.dtype, device=like.device)
        prior = DiagNormal(zeros, torch.ones_like(zeros))
        posterior = self.posterior_params(x) if x is not None else None
        z = choose_z(0, prior, posterior)
        context = zeros[:, :0]  # a single group has no decoder state before it
        group = LatentGroup(z=z, prior=prior, context=context, posterior=posterior)
        return TowerPass(groups=[group], x_dist=self.decoder_params(z))
