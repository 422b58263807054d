"""Networks of the latent-space EBM prior family trained jointly with its generator (no backbone):

- LEBM (lebm_supplement.md, Table 2): p_beta(x|z) = N(g_beta(z), sigma^2 I) with a DCGAN-style g, and the prior
  p_alpha(z) ∝ exp(f_alpha(z)) N(z; 0, I) with f_alpha an MLP.
- The multi-layer joint EBM prior (joint_latent_ebm_prior.md Eq. 6-7, Table 12), L = 2:
  p(z1, z2) ∝ exp(f_1(z1) + f_2(z2)) N(z1; mu(z2), sigma(z2)^2) N(z2; 0, I), x ~ N(g(z1), sigma^2 I).

Both are one module, `LatentEBMModel`, with `generator.layers` 1 or 2. The prior is parameterized by the noise
eps = (eps_1[, eps_2]) ~ N(0, I) through the invertible map T (joint_latent_ebm_prior.md App. A.3, Eq. 28-29):
    z2 = eps_2,   z1 = mu(z2) + sigma(z2) * eps_1          (layers = 2)
    z1 = eps_1                                              (layers = 1: T is the identity)
Lists of latents are ordered bottom-up: [z1] or [z1, z2].

An optional bottom-up inference model q(z|x) = q(z1|x) q(z2|z1) (joint_latent_ebm_prior.md Eq. 4, Sec. 3.3, Table 12;
lebm_supplement.md A.11 for L = 1) amortizes posterior sampling. Nothing here knows about training or ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.models.distributions import sum_except_batch

# Transposed-convolution stacks of g (z1 -> x) as (kernel, stride, padding, width multiple of ngf); the last layer
# outputs the image channels and has no multiple (None). lebm_supplement.md Table 2; Table 12 for CelebA-64.
GENERATOR_ARCHS: dict[str, tuple[int, list[tuple[int, int, int, int | None]]]] = {
    # the quickstart digits (not a paper architecture): 1x1 -> 4 -> 8 -> 16
    "dcgan16": (16, [(4, 1, 0, 4), (4, 2, 1, 2), (4, 2, 1, None)]),
    # SVHN: 1x1 -> 4 -> 8 -> 16 -> 32
    "dcgan32": (32, [(4, 1, 0, 8), (4, 2, 1, 4), (4, 2, 1, 2), (4, 2, 1, None)]),
    # CIFAR-10: 1x1 -> 8 -> 16 -> 32, then a 3x3 stride-1 output layer
    "cifar10": (32, [(8, 1, 0, 8), (4, 2, 1, 4), (4, 2, 1, 2), (3, 1, 1, None)]),
    # CelebA-64: 1x1 -> 4 -> 8 -> 16 -> 32 -> 64
    "dcgan64": (64, [(4, 1, 0, 8), (4, 2, 1, 4), (4, 2, 1, 2), (4, 2, 1, 1), (4, 2, 1, None)]),
}


@dataclass
class GeneratorConfig:
    layers: int = 1  # latent layers: 1 = LEBM, 2 = the joint EBM prior's two-layer generator (z2 -> z1 -> x)
    arch: str = "dcgan32"  # convT stack of g (GENERATOR_ARCHS): dcgan32 (SVHN) | cifar10 | dcgan64 (CelebA-64) |
    #              dcgan16 (quickstart digits)
    z_dim: int = 100  # dimension of z1, the input of g (100; 128 for CIFAR-10)
    top_dim: int = 100  # dimension of z2 (layers = 2; Table 12: 100)
    top_hidden: int = 200  # width of the MLP z2 -> (mu, log sigma) of p(z1|z2) (Table 12: 200)
    ngf: int = 64  # channel multiple of g (Table 2: 64 SVHN, 128 CIFAR-10 and CelebA-64)
    out_channels: int = 3  # image channels
    slope: float = 0.1  # LeakyReLU slope of the generator networks (Table 2: 0.1)
    sigma: float = 0.3  # std of p_beta(x|z) = N(g(z), sigma^2 I) (the supplement's code: llhd_sigma = 0.3)

    @property
    def image_size(self) -> int:
        return GENERATOR_ARCHS[self.arch][0]

    def latent_dims(self) -> list[int]:
        """[dim z1] or [dim z1, dim z2]."""
        return [self.z_dim] if self.layers == 1 else [self.z_dim, self.top_dim]

    def validate(self) -> None:
        if self.layers not in (1, 2):
            raise ValueError(f"generator.layers must be 1 (LEBM) or 2 (joint EBM prior), got {self.layers}")
        if self.arch not in GENERATOR_ARCHS:
            raise ValueError(f"generator.arch must be one of {sorted(GENERATOR_ARCHS)}, got {self.arch!r}")
        if min(self.z_dim, self.top_dim, self.top_hidden, self.ngf, self.out_channels) < 1:
            raise ValueError("generator.z_dim, top_dim, top_hidden, ngf and out_channels must be positive")
        if not self.sigma > 0:
            raise ValueError(f"generator.sigma must be > 0, got {self.sigma}")


@dataclass
class PriorEBMConfig:
    hidden: int = 200  # width of f_1 (on z1) (lebm_supplement.md Table 2: 200)
    num_hidden: int = 2  # Linear + LReLU blocks of f_1 before its Linear(1) (Table 2: 2; Table 12: 4)
    top_hidden: int = 100  # width of f_2 (on z2; layers = 2) (Table 12: 100)
    top_num_hidden: int = 3  # Linear + LReLU blocks of f_2 (Table 12: 3)
    slope: float = 0.2  # LeakyReLU slope of the EBMs (Table 2: 0.2)

    def validate(self) -> None:
        if min(self.hidden, self.num_hidden, self.top_hidden, self.top_num_hidden) < 1:
            raise ValueError("ebm.hidden, num_hidden, top_hidden and top_num_hidden must be positive")


@dataclass
class InferenceConfig:
    enabled: bool = False  # build q(z|x) (set by the method when sampler.posterior=inference)
    ngf: int = 64  # channel multiple of the conv encoder q(z1|x) (Table 12: 128 for CelebA-64)
    hidden: int = 200  # width of the MLP q(z2|z1) (Table 12: 200)
    slope: float = 0.1  # LeakyReLU slope of the inference networks

    def validate(self) -> None:
        if min(self.ngf, self.hidden) < 1:
            raise ValueError("inference.ngf and inference.hidden must be positive")


def mlp(in_dim: int, width: int, num_hidden: int, out_dim: int, slope: float) -> nn.Sequential:
    """num_hidden x (Linear(width), LReLU(slope)), then Linear(out_dim)."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_hidden):
        layers += [nn.Linear(d, width), nn.LeakyReLU(slope)]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def conv_generator(config: GeneratorConfig) -> nn.Sequential:
    """g: (B, z_dim) viewed as (B, z_dim, 1, 1) -> (B, C, S, S) in [-1, 1] (Table 2: LReLU 0.1, Tanh out)."""
    _, spec = GENERATOR_ARCHS[config.arch]
    layers: list[nn.Module] = []
    c = config.z_dim
    for i, (k, s, p, mult) in enumerate(spec):
        out = config.out_channels if mult is None else config.ngf * mult
        layers.append(nn.ConvTranspose2d(c, out, k, s, p))
        layers.append(nn.Tanh() if i == len(spec) - 1 else nn.LeakyReLU(config.slope))
        c = out
    return nn.Sequential(*layers)


def conv_encoder(config: GeneratorConfig, inference: InferenceConfig) -> nn.Sequential:
    """q(z1|x): stride-2 4x4 convs from S down to 4x4 with widths ending at 8 ngf, then a 4x4 conv to 2 z_dim
    (mean and log sigma), the mirror of g (joint_latent_ebm_prior.md Table 12 for 64x64: 128-256-512-1024-200)."""
    steps = int(math.log2(config.image_size // 4))
    layers: list[nn.Module] = []
    c = config.out_channels
    for i in range(steps):
        out = inference.ngf * 2 ** (i + 4 - steps)
        layers += [nn.Conv2d(c, out, 4, 2, 1), nn.LeakyReLU(inference.slope)]
        c = out
    layers.append(nn.Conv2d(c, 2 * config.z_dim, 4, 1, 0))
    return nn.Sequential(*layers)


def xavier_normal_init(module: nn.Module) -> None:
    """Xavier-normal weights, zero biases, for every linear and (transposed) convolution (lebm_supplement.md B.1)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor | float = 0.0,
                      log_sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-sample log N(z; mu, exp(log_sigma)^2 I), summed over all but the batch dimension, in fp32."""
    z = z.float()
    log_sigma = torch.as_tensor(log_sigma, dtype=torch.float32, device=z.device)
    r = (z - torch.as_tensor(mu, dtype=torch.float32, device=z.device)) * torch.exp(-log_sigma)
    lp = -0.5 * r.pow(2) - log_sigma - 0.5 * math.log(2 * math.pi)
    return sum_except_batch(lp.expand_as(z))


class LatentEBMModel(nn.Module):
    """Generator, latent EBM prior and (optionally) inference model of LEBM / the joint EBM prior.

    Submodules: `g` (z1 -> x), `top` (z2 -> mu, log sigma of z1; layers = 2), `f` (f_1[, f_2]), `enc` and
    `enc_top` (q(z1|x), q(z2|z1); when inference.enabled). Inputs of any dtype are cast to the parameters' dtype
    and outputs come back in fp32, so the module also runs with bf16/fp16 weights.
    """

    def __init__(self, generator: GeneratorConfig, ebm: PriorEBMConfig, inference: InferenceConfig | None = None):
        super().__init__()
        self.config = generator
        self.ebm_config = ebm
        self.inference_config = inference or InferenceConfig()
        dims = generator.latent_dims()
        self.g = conv_generator(generator)
        self.top = (mlp(generator.top_dim, generator.top_hidden, 2, 2 * generator.z_dim, generator.slope)
                    if generator.layers == 2 else None)
        self.f = nn.ModuleList([mlp(dims[0], ebm.hidden, ebm.num_hidden, 1, ebm.slope)])
        if generator.layers == 2:
            self.f.append(mlp(dims[1], ebm.top_hidden, ebm.top_num_hidden, 1, ebm.slope))
        self.enc = self.enc_top = None
        if self.inference_config.enabled:
            self.enc = conv_encoder(generator, self.inference_config)
            if generator.layers == 2:
                self.enc_top = mlp(generator.z_dim, self.inference_config.hidden, 2, 2 * generator.top_dim,
                                   self.inference_config.slope)
        xavier_normal_init(self)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def layers(self) -> int:
        return self.config.layers

    def latent_dims(self) -> list[int]:
        return self.config.latent_dims()

    def x_shape(self) -> tuple[int, int, int]:
        return (self.config.out_channels, self.config.image_size, self.config.image_size)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def generator_parameters(self) -> list[nn.Parameter]:
        """beta: g and the conditional p(z1|z2)."""
        return [*self.g.parameters(), *(self.top.parameters() if self.top is not None else [])]

    def ebm_parameters(self) -> list[nn.Parameter]:
        """alpha: f_1[, f_2]."""
        return list(self.f.parameters())

    def inference_parameters(self) -> list[nn.Parameter]:
        """omega: q(z1|x)[, q(z2|z1)]."""
        return [p for m in (self.enc, self.enc_top) if m is not None for p in m.parameters()]

    def sample_noise(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """eps ~ N(0, I) for every latent layer (fp32), the chains' starting point p_0."""
        return [torch.randn(n, d, generator=generator, device=device) for d in self.latent_dims()]

    # ------------------------------------------------------------------------------------------------ the model
    def conditional(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log sigma) of p_beta1(z1|z2) (Table 12: the MLP's 2 z_dim outputs split in two), fp32."""
        out = self.top(z2.to(self._dtype())).float()
        return out[:, : self.config.z_dim], out[:, self.config.z_dim:]

    def transform(self, eps: list[torch.Tensor]) -> list[torch.Tensor]:
        """z = T(eps) (joint_latent_ebm_prior.md Eq. 28-29); the identity for layers = 1."""
        if self.layers == 1:
            return [eps[0]]
        eps1, eps2 = eps
        mu, log_sigma = self.conditional(eps2)
        return [mu + torch.exp(log_sigma) * eps1.float(), eps2]

    def energy(self, z: list[torch.Tensor]) -> torch.Tensor:
        """f(z) = sum_i f_i(z_i) (joint_latent_ebm_prior.md Eq. 6; lebm: f_alpha(z)), per sample, fp32. The prior
        is ∝ exp(f) times the Gaussian prior: higher f means more probable."""
        dtype = self._dtype()
        return sum(fi(zi.to(dtype)).float().reshape(zi.shape[0]) for fi, zi in zip(self.f, z))

    def log_conditional(self, z: list[torch.Tensor]) -> torch.Tensor:
        """log p_beta1(z1|z2) per sample (0 for layers = 1)."""
        if self.layers == 1:
            return torch.zeros(z[0].shape[0], device=z[0].device)
        mu, log_sigma = self.conditional(z[1])
        return gaussian_log_prob(z[0], mu, log_sigma)

    def log_gaussian_prior(self, z: list[torch.Tensor]) -> torch.Tensor:
        """log p_beta>0(z) = log N(z_L; 0, I) + sum log p(z_i|z_i+1) (joint_latent_ebm_prior.md Eq. 2)."""
        return gaussian_log_prob(z[-1]) + self.log_conditional(z)

    def decode(self, z1: torch.Tensor) -> torch.Tensor:
        """g(z1): the mean of p_beta(x|z), fp32 images in [-1, 1]."""
        return self.g(z1.to(self._dtype()).reshape(z1.shape[0], -1, 1, 1)).float()

    def reconstruction_energy(self, x: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """-log p_beta(x|z) + const = ||x - g(z1)||^2 / (2 sigma^2) per sample (lebm_supplement.md App. D)."""
        return sum_except_batch((x.float() - self.decode(z1)).pow(2)) / (2 * self.config.sigma ** 2)

    # ------------------------------------------------------------------------------------------------ inference
    def encode(self, x: torch.Tensor, noise: list[torch.Tensor] | None = None,
               use_mean: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """z ~ q(z|x) = q(z1|x) q(z2|z1) by reparameterization (Eq. 4, bottom-up) and log q(z|x) per sample.
        `noise`: the standard normals of each layer (drawn from the global generator when None); `use_mean`: the
        means instead of samples (reconstructions)."""
        if self.enc is None:
            raise RuntimeError("this model has no inference network (inference.enabled=false)")
        dtype = self._dtype()
        h = self.enc(x.to(dtype)).float().flatten(1)
        mu1, ls1 = h[:, : self.config.z_dim], h[:, self.config.z_dim:]
        if noise is None:
            noise = [torch.randn_like(mu1)] + ([torch.randn(x.shape[0], self.config.top_dim, device=x.device)]
                                              if self.layers == 2 else [])
        z1 = mu1 if use_mean else mu1 + torch.exp(ls1) * noise[0]
        log_q = gaussian_log_prob(z1, mu1, ls1)
        z = [z1]
        if self.layers == 2:
            h2 = self.enc_top(z1.to(dtype)).float()
            mu2, ls2 = h2[:, : self.config.top_dim], h2[:, self.config.top_dim:]
            z2 = mu2 if use_mean else mu2 + torch.exp(ls2) * noise[1]
            log_q = log_q + gaussian_log_prob(z2, mu2, ls2)
            z.append(z2)
        return z, log_q

    # ------------------------------------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, positive: list[torch.Tensor], negative_eps: list[torch.Tensor],
                amortized: bool = False) -> dict[str, torch.Tensor]:
        """Per-sample terms of one learning step (what the engine runs).

        positive: the posterior chains' final latents z+ (a constant of the update; lebm_supplement.md Eq. 39-40,
            joint_latent_ebm_prior.md Eq. 9-11), or with `amortized` the standard normals of the inference model's
            reparameterized z+ ~ q(z|x) (Sec. 3.3, Eq. 16-19).
        negative_eps: the prior chains' final eps; z- = T(eps-) (App. A.3) is a constant of the update.
        Returns rec = ||x - g(z1+)||^2 / (2 sigma^2), f_pos = f(z+), f_neg = f(z-), logc_pos / logc_neg =
        log p(z1|z2) at z+ / z-, and with `amortized` log_q = log q(z+|x) and log_prior = log p_beta>0(z+).
        """
        with torch.no_grad():
            z_neg = [z.detach() for z in self.transform(negative_eps)]
        out: dict[str, torch.Tensor] = {}
        if amortized:
            z_pos, out["log_q"] = self.encode(x, positive)
            out["log_prior"] = self.log_gaussian_prior(z_pos)
        else:
            z_pos = [z.detach() for z in positive]
        out["rec"] = self.reconstruction_energy(x, z_pos[0])
        out["f_pos"] = self.energy(z_pos)
        out["f_neg"] = self.energy(z_neg)
        out["logc_pos"] = self.log_conditional(z_pos)
        out["logc_neg"] = self.log_conditional(z_neg)
        return out
