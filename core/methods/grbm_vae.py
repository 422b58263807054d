"""A VAE whose prior is a Gaussian-Bernoulli RBM, trained jointly without log Z (unnormalized_prior_vae_grbm.md).

Algorithm 1, one step on a batch x:
    z ~ q(z|x) (reparameterized)
    encoder/decoder:  maximize the analogous lower bound  E_q[log p(x|z) - E(z) - log q(z|x)]   (Sec. 2, ALB)
                      (the GRBM's parameters are detached here: log Z does not depend on alpha, phi)
    prior:            sliced score matching on the reused z, detached (Song et al. 2019; `ssm.variant` plain | vr)
    loss = -ALB + SSM, one backward; the two parts touch disjoint parameters, which live in two Adam parameter groups
    (`optim.lr` for the VAE, `optim.prior_lr` for the GRBM; Sec. 4: 1e-3 and 2e-4) inside one engine.

Sampling: Langevin on E(z) (Eq. 11, eta = 2 s in core.sampling.langevin's convention, see core/models/grbm.py) or
block Gibbs (`sampler.method`), then the decoder's mean. Registered as `grbm_vae-<dataset>`; the `grbm_vae` model kind
is rebuilt here too. Likelihoods (AIS log Z, importance sampling, Algorithm 2): core/evaluation/grbm_likelihood.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.methods.base import Method, MethodContext, StepCounter, register_method
from core.methods.bundles import SampleOptions, Samples, TrainedModel, freeze, register
from core.methods.nvae import float_state
from core.models.grbm import GRBM, GRBMConfig, GRBMParams, gibbs_sample, langevin_sample
from core.models.grbm_vae_nets import GRBMVAENets, GRBMVAENetsConfig, gaussian_log_prob
from core.objectives.score_matching import SSMConfig, draw_projections, sliced_score_matching
from core.optim.config import OptimConfig
from core.sampling.rng import rank_generator
from core.seeding import derive_seed
from core.visuals import chain_energy_figure, save_grid

_GRID_STREAM = 0x6B8  # fixed chain starts of the sample grids
_GRID_CHAIN_STREAM = 0x6B9  # their Langevin / Gibbs noise
SAMPLERS = ("langevin", "gibbs")
INITS = ("normal", "base")


@dataclass
class GRBMSamplerConfig:
    method: str = "langevin"  # langevin (Eq. 11) | gibbs (block Gibbs: h | z Bernoulli, z | h Gaussian)
    steps: int = 100  # Langevin steps / Gibbs sweeps at test time (Sec. 4: 100 MNIST, 50 CIFAR-10)
    step_size: float = 0.05  # s of Eq. 11: z <- z - s grad E + sqrt(2 s) w (run_langevin's eta is 2 s); the paper
    #                          gives none: 0.05 mixes within 100 steps for prior scales ~1 (bias O(s / sigma^2))
    init: str = "normal"  # chain starts: normal: N(0, I) | base: N(mu, sigma^2), the GRBM's visible base Gaussian

    def validate(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"sampler.method must be one of {SAMPLERS}, got {self.method!r}")
        if self.init not in INITS:
            raise ValueError(f"sampler.init must be one of {INITS}, got {self.init!r}")
        if self.steps < 0 or self.step_size <= 0:
            raise ValueError("sampler.steps must be >= 0 and sampler.step_size > 0")


@dataclass
class GRBMVAEOptimConfig(OptimConfig):
    lr: float = 1e-3  # Adam learning rate of the encoder and decoder (Sec. 4)
    prior_lr: float = 2e-4  # Adam learning rate of the GRBM prior (Sec. 4); follows the same schedule shape
    lr_min: float = 1e-3  # schedule floor for the VAE group (equal to lr: constant, as the paper)
    weight_decay: float = 0.0  # Adam weight decay
    eps: float = 1e-8  # Adam epsilon
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas

    def validate(self) -> None:
        super().validate()
        if self.prior_lr <= 0:
            raise ValueError("optim.prior_lr must be > 0")


@dataclass
class GRBMVAEConfig:
    nets: GRBMVAENetsConfig = field(default_factory=GRBMVAENetsConfig)  # encoder, decoder, likelihood, data space
    grbm: GRBMConfig = field(default_factory=GRBMConfig)  # the prior (visible must equal nets.latent_dim)
    ssm: SSMConfig = field(default_factory=SSMConfig)  # the prior's objective (sliced score matching)
    sampler: GRBMSamplerConfig = field(default_factory=GRBMSamplerConfig)  # test-time sampling from the prior
    optim: GRBMVAEOptimConfig = field(default_factory=GRBMVAEOptimConfig)  # Adam, two parameter groups
    max_abs_ssm: float = 1e6  # |SSM loss| above this (or non-finite) at a report counts as divergence

    def validate(self, dataset) -> None:
        """Raises ValueError naming the key when settings or data disagree."""
        self.optim.validate()
        self.nets.validate()
        self.grbm.validate()
        self.ssm.validate()
        self.sampler.validate()
        if self.grbm.visible != self.nets.latent_dim:
            raise ValueError(f"grbm.visible={self.grbm.visible} must equal nets.latent_dim={self.nets.latent_dim}")
        if dataset.channels != self.nets.channels:
            raise ValueError(f"dataset.channels={dataset.channels} but nets.channels={self.nets.channels}")
        side = dataset.resolution or dataset.size
        if side is not None and side != self.nets.image_size:
            raise ValueError(f"the data are {side}x{side} but nets.image_size={self.nets.image_size}")
        if self.nets.data_space == "binary" and not dataset.binarize:
            raise ValueError("nets.data_space=binary (Bernoulli decoder) needs dynamically binarized data: "
                             "dataset.binarize=true")
        if self.nets.data_space == "logit" and (dataset.binarize or dataset.num_bits != 8):
            raise ValueError("nets.data_space=logit dequantizes 8-bit data: dataset.binarize=false, num_bits=8")


class GRBMVAEModule(torch.nn.Module):
    """What the engine trains: encoder + decoder (`nets`) and the GRBM prior (`grbm`)."""

    def __init__(self, nets: GRBMVAENetsConfig, grbm: GRBMConfig):
        super().__init__()
        self.nets = GRBMVAENets(nets)
        self.grbm = GRBM(grbm)

    def forward(self, y: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, ssm_variant: str):
        """(decoder output, z, log q(z|y), E(z) with the prior detached, per-sample SSM loss on z.detach())."""
        mean, logvar = self.nets.encoder(y)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_q = gaussian_log_prob(z, mean, logvar)
        energy = self.grbm.energy(z, detach_params=True)  # ALB: gradients reach z (phi), never the prior
        ssm = sliced_score_matching(self.grbm.energy, z.detach(), v, ssm_variant)  # prior on reused z (Alg. 1 l.5)
        return self.nets.decoder(z), z, log_q, energy, ssm




def chain_starts(params: GRBMParams, n: int, init: str, generator: torch.Generator | None) -> torch.Tensor:
    """Chain starts (n, D): N(0, I) or the base Gaussian N(mu, sigma^2)."""
    d = params.mu.numel()
    eps = torch.randn(n, d, generator=generator, device=params.mu.device)
    return eps if init == "normal" else params.mu + torch.exp(params.log_sigma) * eps


def sample_prior(params: GRBMParams, z0: torch.Tensor, sampler: GRBMSamplerConfig, steps: int, step_size: float,
                 generator: torch.Generator | None, record_every: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prior samples from chain starts z0 by `sampler.method`; (final z, recorded snapshots)."""
    if sampler.method == "langevin":
        result = langevin_sample(params, z0, steps, step_size, generator, record_every)
        return result.state[0], [s[0] for s in result.snapshots]
    snaps, z = ([z0] if record_every else []), z0
    p = params.detach().to(torch.float32)
    for k in range(steps):
        z = gibbs_sample(p, z, 1, generator)
        if record_every and ((k + 1) % record_every == 0 or k + 1 == steps):
            snaps.append(z)
    return z, snaps


@register_method
class GRBMVAEMethod(Method):
    name = "grbm_vae"
    config_class = GRBMVAEConfig
    model_prefix = "grbm_vae"
    needs_backbone = False

    def __init__(self, config: GRBMVAEConfig, ctx: MethodContext, backbone=None, backbone_bundle=None):
        super().__init__(config, ctx)
        torch.manual_seed(ctx.seed)  # identical initial weights on every rank
        self.model = GRBMVAEModule(config.nets, config.grbm).to(ctx.device)
        self.iteration = StepCounter()
        gen = torch.Generator().manual_seed(derive_seed(ctx.seed, _GRID_STREAM))
        self.fixed_eps = torch.randn(ctx.sample_count, config.nets.latent_dim, generator=gen)

    def trained_module(self) -> torch.nn.Module:
        return self.model

    def param_groups(self) -> list[dict[str, Any]]:
        """Two learning rates in one engine (Sec. 4): the VAE's and the prior's."""
        return [{"params": list(self.model.nets.parameters()), "lr": self.config.optim.lr},
                {"params": list(self.model.grbm.parameters()), "lr": self.config.optim.prior_lr}]

    def make_optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        o = self.config.optim
        return torch.optim.Adam(param_groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def setup(self, first_batch: dict[str, Any], fresh: bool) -> None:
        want = (self.config.nets.channels, self.config.nets.image_size, self.config.nets.image_size)
        got = tuple(first_batch["x"].shape[1:])
        if got != want:
            raise ValueError(f"the loader delivers images of shape {got} but nets expects {want}")

    def loss(self, net: Callable[..., Any], batch: dict[str, Any], nimg: int):
        c, dev, it = self.config, self.ctx.device, self.iteration.value
        x = batch["x"].to(dev, non_blocking=True).float()
        y, log_det = self.model.nets.data.to_targets(x, rank_generator(self.ctx.seed, self.ctx.rank, it, dev, 0))
        eps = torch.randn(x.shape[0], c.nets.latent_dim, device=dev,
                          generator=rank_generator(self.ctx.seed, self.ctx.rank, it, dev, 1))
        v = draw_projections((x.shape[0], c.nets.latent_dim), c.ssm,
                             rank_generator(self.ctx.seed, self.ctx.rank, it, dev, 2), dev)
        decoded, z, log_q, energy, ssm = net(y, eps, v, c.ssm.variant)
        decoded = decoded.float()
        scale = None
        if c.nets.likelihood == "laplace":
            # Decoder calibration (Rybkin et al. 2021): the Laplace scale maximizing the likelihood is the mean L1
            # error; over all ranks' batches, so every rank uses (and stores) the same value.
            err = torch.stack([(y - decoded).abs().sum().detach(), torch.tensor(float(y.numel()), device=dev)])
            err = self.ctx.reduce_sum(err)
            scale = (err[0] / err[1]).clamp(min=c.nets.min_laplace_scale)
            with torch.no_grad():
                buf = self.model.nets.laplace_scale
                m = c.nets.laplace_scale_momentum if it > 0 else 0.0
                buf.copy_(m * buf + (1 - m) * scale)
        log_px = self.model.nets.log_likelihood(decoded, y, scale)
        alb = log_px - energy.float() - log_q.float()  # Sec. 2: the analogous lower bound, no log Z
        loss = -alb.mean() + ssm.float().mean()
        self.iteration.value += 1
        metrics = {
            "train/alb": alb.mean().detach(),
            "train/reconstruction": log_px.mean().detach(),
            "train/prior_energy": energy.mean().detach(),
            "train/entropy": (-log_q).mean().detach(),
            "train/log_det": log_det.mean().detach(),
            "prior/ssm": ssm.mean().detach(),
            "prior/sigma_mean": torch.exp(self.model.grbm.log_sigma).mean().detach(),
            "prior/weight_norm": self.model.grbm.W.norm().detach(),
            "latent/z_std": z.detach().std(0).mean(),
        }
        if scale is not None:
            metrics["train/laplace_scale"] = scale.detach()
        return loss, metrics

    @torch.no_grad()
    def visuals(self, out_dir: Path, nimg: int) -> list[Path]:
        """Prior samples from fixed chain starts (test-time sampler) and a decode of N(0, I) for comparison; with the
        Langevin sampler, the chain's per-step GRBM energy E(z) (mean ± std over the chains)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        c, dev = self.config, self.ctx.device
        was_training = self.model.training
        self.model.eval()
        params = self.model.grbm.params(detach=True)
        eps = self.fixed_eps.to(dev)
        z0 = eps if c.sampler.init == "normal" else params.mu + torch.exp(params.log_sigma) * eps
        gen = torch.Generator(device=dev).manual_seed(derive_seed(self.ctx.seed, _GRID_CHAIN_STREAM))
        chain = None
        if c.sampler.method == "langevin":  # what sample_prior runs, kept for its per-step energies
            chain = langevin_sample(params, z0, c.sampler.steps, c.sampler.step_size, gen)
            z = chain.state[0]
        else:
            z, _ = sample_prior(params, z0, c.sampler, c.sampler.steps, c.sampler.step_size, gen)
        tag = f"nimg-{nimg:012d}"
        paths = [save_grid(self.model.nets.data.to_images(self.model.nets.decoder(z).float()),
                           out_dir / f"{tag}-samples.png"),
                 save_grid(self.model.nets.data.to_images(self.model.nets.decoder(eps).float()),
                           out_dir / f"{tag}-normal.png")]
        if chain is not None and c.sampler.steps > 0:  # training runs no chains (score matching): the grid's chain
            paths.append(chain_energy_figure(out_dir / f"{tag}-chain-energy.png", nimg, {},
                                             {"prior chain (fixed starts)": chain}))
        self.model.train(was_training)
        return paths

    def health(self, metrics: dict[str, float]) -> str | None:
        ssm = metrics.get("prior/ssm", 0.0)
        if not abs(ssm) < self.config.max_abs_ssm:  # also catches NaN
            return f"|SSM loss| = {abs(ssm):.3g} exceeds {self.config.max_abs_ssm:g}"
        if not abs(metrics.get("train/alb", 0.0)) < float("inf"):
            return "the lower bound is not finite"
        return None

    def shared_state(self):
        return {"method": self.iteration}

    def export(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c = self.config
        bundle = {"kind": "grbm_vae", "nets": dataclasses.asdict(c.nets), "grbm": dataclasses.asdict(c.grbm),
                  "sampler": dataclasses.asdict(c.sampler)}
        return bundle, float_state(self.model)

    @classmethod
    def describe(cls, config: GRBMVAEConfig):
        return [("Encoder + decoder", GRBMVAENets(config.nets)), ("GRBM prior", GRBM(config.grbm))]


@register("grbm_vae")
class GRBMVAEModel(TrainedModel):
    """A trained VAE with a GRBM prior: prior samples by Langevin or Gibbs, decoded by the decoder's mean.

    Also what core/evaluation/grbm_likelihood.py evaluates: `targets`, `encode`, `log_likelihood`, `prior_energy`,
    `grbm_params`, `sample_latents`."""

    energy_based = True
    # SampleOptions(steps=0): the chain starts decoded, i.e. decodes of N(0, I) (sampler.init=normal) -- what the
    # decoder gives without the learned prior, from the same noise as the prior's chains.
    baseline = "decoded chain starts (N(0, I))"

    def __init__(self, module: GRBMVAEModule, sampler: GRBMSamplerConfig):
        self.module = module
        self.sampler = sampler

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], weights: dict[str, torch.Tensor]) -> "GRBMVAEModel":
        nets = GRBMVAENetsConfig(**bundle["nets"])
        module = GRBMVAEModule(nets, GRBMConfig(**bundle["grbm"]))
        module.load_state_dict(weights, strict=True)
        return cls(module, GRBMSamplerConfig(**bundle["sampler"]))

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "GRBMVAEModel":
        self.module = freeze(self.module, device, torch.float32)  # the prior's math stays fp32
        return self

    @property
    def device(self) -> torch.device:
        return self.module.grbm.W.device

    @property
    def data_space(self) -> str:
        return self.module.nets.config.data_space

    # --- likelihood interface (core/evaluation/grbm_likelihood.py)
    def grbm_params(self) -> GRBMParams:
        return self.module.grbm.params(detach=True)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(decoder targets y, log |dy/dx|) of images x in [-1, 1]; binary data must already be binarized (a
        Bernoulli likelihood of grey values is no likelihood: ValueError)."""
        y, log_det = self.module.nets.data.to_targets(x.to(self.device).float(), generator)
        if self.data_space == "binary" and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("this model has a Bernoulli decoder: evaluate it on binarized images "
                             "(dataset.binarize=true)")
        return y, log_det

    @torch.no_grad()
    def encode(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.nets.encoder(y)

    @torch.no_grad()
    def log_likelihood(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.module.nets.log_likelihood(self.module.nets.decoder(z), y)

    @torch.no_grad()
    def prior_energy(self, z: torch.Tensor) -> torch.Tensor:
        return self.module.grbm.energy(z)

    def sample_latents(self, n: int, generator: torch.Generator, steps: int | None = None,
                       step_size: float | None = None) -> torch.Tensor:
        s = self.sampler
        params = self.grbm_params()
        z0 = chain_starts(params, n, s.init, generator)
        z, _ = sample_prior(params, z0, s, s.steps if steps is None else steps, step_size or s.step_size, generator)
        return z

    @torch.no_grad()
    def decode(self, z: torch.Tensor, use_mean: bool = True, generator: torch.Generator | None = None):
        out = self.module.nets.decoder(z).float()
        nets = self.module.nets
        if not use_mean:
            if nets.config.likelihood == "bernoulli":
                u = torch.rand(out.shape, generator=generator, device=out.device)
                return (u < torch.sigmoid(out)).float() * 2 - 1
            u = torch.rand(out.shape, generator=generator, device=out.device) - 0.5  # Laplace by inverse CDF
            out = out - nets.laplace_scale * torch.sign(u) * torch.log1p(-2 * u.abs())
        return nets.data.to_images(out)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Decoder means at one posterior sample z ~ q(z|x), as images in [-1, 1]."""
        y, _ = self.module.nets.data.to_targets(x.to(self.device).float(), generator)
        mean, logvar = self.encode(y)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.decode(z)

    def sample(self, n: int, generator: torch.Generator, options: SampleOptions | None = None) -> Samples:
        """Prior chains (`steps`, default the test-time length; 0: the baseline) from the configured starts."""
        o = options or SampleOptions()
        s = self.sampler
        steps = s.steps if o.steps is None else o.steps
        params = self.grbm_params()
        z0 = chain_starts(params, n, s.init, generator)
        record = max(steps // o.strip_frames, 1) if o.strip_frames and steps else 0
        z, snaps = sample_prior(params, z0, s, steps, o.step_size or s.step_size, generator, record)
        use_mean = True if o.use_mean is None else o.use_mean
        frames = [self.decode(f) for f in snaps] or None
        return Samples(self.decode(z, use_mean, generator), frames)


__all__ = ["GRBMVAEMethod", "GRBMVAEConfig", "GRBMVAEModel", "GRBMVAEModule", "GRBMSamplerConfig",
           "GRBMVAEOptimConfig", "sample_prior", "chain_starts"]
