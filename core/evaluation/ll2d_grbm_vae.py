"""The `grbm_vae` row of the 2-D likelihood protocol (`metric=ll2d`; unnormalized_prior_vae_grbm.md Algorithm 1).

Unlike the rows that refine the protocol's frozen VAE, this method trains its own encoder and decoder jointly with
the GRBM prior, from scratch, on `ctx.train` (the paper's point: the prior shapes the VAE):
    encoder/decoder: the analogous lower bound E_q[log p(x|z) - E(z) - log q(z|x)] (no log Z; prior detached)
    prior:           sliced score matching on the reused posterior samples (core.objectives.score_matching)
with a Gaussian decoder p(x|z) = N(mu(z), diag sigma(z)^2) as the protocol's VAE has. The prior's hidden layer is
small (H <= 20), so log Z is exact (enumeration of the 2^H hidden states, core/models/grbm.py) and

    log p(x) ~= log (1/K) sum_k exp(log p(x|z_k) - E(z_k) - log q(z_k|x)) - log Z,   z_k ~ q(z|x)   (Eq. 4, exact Z)

is a consistent estimate per test point (`log_likelihood`). `log_z_check` is AIS (an independent estimate of the same
log Z). `extra` reports, on the first `extra_points` test points, the paper's estimators beside it: the ELBO with the
exact log Z, Eq. 3 and Eq. 4 with log Z self-normalized from q(z|x), and Algorithm 2's classifier ELBO.

Beyond the paper, the weight of (-E - log q) in the bound rises linearly from 0 to 1 over `warmup` of training (KL
annealing): with a learned decoder variance the 2-D VAE otherwise first inflates sigma_x and collapses the posterior,
as the protocol's own VAE does without its warm-up. Model selection: the validation log-likelihood (validation points,
exact log Z) every `eval_every` steps; the best weights are kept, test points never choose.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from core.evaluation.grbm_likelihood import (AISConfig, ClassifierConfig, ais_log_partition, importance_estimates,
                                             train_ratio_classifier)
from core.evaluation.ll2d_seam import BestState, LL2DContext, LL2DRow, load_or_train
from core.models.grbm import GRBM, GRBMConfig, exact_log_partition, gibbs_sample, MAX_EXACT_HIDDEN
from core.models.grbm_vae_nets import gaussian_log_prob
from core.objectives.score_matching import SSMConfig, draw_projections, sliced_score_matching

log = logging.getLogger("vaebm.evaluation.ll2d_grbm_vae")


@dataclass
class GRBMVAERowConfig:
    latent_dim: int = 2  # Gaussian latents = GRBM visible units
    grbm_hidden: int = 16  # GRBM hidden units H (<= 20: log Z by exact enumeration of 2^H states)
    grbm_init_std: float = 1.0  # initial std of the GRBM weights (larger than the image presets: 2-D modes are far)
    net_hidden: int = 128  # width of the encoder and decoder MLP layers
    net_layers: int = 3  # hidden layers of the encoder and of the decoder
    min_log_sigma_x: float = -5.0  # floor of the decoder's log standard deviation
    steps: int = 8000  # Adam steps (encoder, decoder and prior together)
    batch: int = 512  # training points per step
    lr: float = 1e-3  # Adam learning rate of the encoder/decoder (Sec. 4)
    prior_lr: float = 2e-4  # Adam learning rate of the GRBM (Sec. 4: 2e-4; 1e-3 diverged on seed 1: log Z -> 170)
    lr_min_fraction: float = 0.05  # both rates are cosine-annealed to this fraction
    warmup: float = 0.2  # fraction of steps over which the weight of (-E - log q) rises from 0 to 1
    ssm_variant: str = "vr"  # sliced score matching: vr | plain
    ssm_projections: int = 1  # projections per sample
    eval_every: int = 500  # steps between validation scores
    val_points: int = 2000  # validation points of the model selection (the first of ctx.val)
    importance_samples: int = 64  # K posterior samples per test point (Eq. 4)
    ais_chains: int = 200  # AIS log Z cross-check: chains
    ais_betas: int = 2000  # AIS log Z cross-check: intermediate distributions
    extra_points: int = 5000  # test points for the side-by-side estimators (Eq. 3, Eq. 4, Algorithm 2)
    classifier_steps: int = 2000  # Algorithm 2: Adam steps of the density-ratio classifier
    classifier_prior_samples: int = 50_000  # Algorithm 2: prior samples (block Gibbs, `gibbs_sweeps` sweeps)
    gibbs_sweeps: int = 200  # block-Gibbs sweeps for those prior samples (from N(mu, sigma^2))
    seed_offset: int = 41  # the row's random streams: ctx.generator(seed_offset + i)

    def validate(self) -> None:
        for name in ("latent_dim", "grbm_hidden", "net_hidden", "net_layers", "steps", "batch", "eval_every",
                     "val_points", "importance_samples", "ais_chains", "ais_betas", "extra_points",
                     "classifier_steps", "classifier_prior_samples", "gibbs_sweeps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ll2d grbm_vae: {name} must be >= 1")
        if self.grbm_hidden > min(20, MAX_EXACT_HIDDEN):
            raise ValueError("ll2d grbm_vae: grbm_hidden must be <= 20 (exact log Z by enumeration)")
        if not (self.lr > 0 and self.prior_lr > 0 and 0 <= self.lr_min_fraction <= 1 and 0 <= self.warmup <= 1):
            raise ValueError("ll2d grbm_vae: need lr, prior_lr > 0 and lr_min_fraction, warmup in [0, 1]")
        SSMConfig(variant=self.ssm_variant, projections=self.ssm_projections).validate()


def _mlp(n_in: int, n_out: int, hidden: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    prev = n_in
    for _ in range(layers):
        mods += [nn.Linear(prev, hidden), nn.ReLU()]
        prev = hidden
    return nn.Sequential(*mods, nn.Linear(prev, n_out))


class PointGRBMVAE(nn.Module):
    """Encoder q(z|x) = N(m(x), diag exp(v(x))), decoder p(x|z) = N(mu(z), diag sigma(z)^2), GRBM prior on z."""

    def __init__(self, c: GRBMVAERowConfig):
        super().__init__()
        self.c = c
        self.encoder = _mlp(2, 2 * c.latent_dim, c.net_hidden, c.net_layers)
        self.decoder = _mlp(c.latent_dim, 4, c.net_hidden, c.net_layers)
        self.grbm = GRBM(GRBMConfig(visible=c.latent_dim, hidden=c.grbm_hidden, init_weight_std=c.grbm_init_std))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, -1)
        return mean, logvar

    def log_px_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.decoder(z).chunk(2, -1)
        log_sigma = log_sigma.clamp(min=self.c.min_log_sigma_x)
        return gaussian_log_prob(x, mu, 2 * log_sigma)


def _key(c: GRBMVAERowConfig) -> str:
    fields = {k: v for k, v in dataclasses.asdict(c).items()
              if k not in ("importance_samples", "ais_chains", "ais_betas", "extra_points", "classifier_steps",
                           "classifier_prior_samples", "gibbs_sweeps")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


@torch.no_grad()
def log_likelihoods(model: PointGRBMVAE, x: torch.Tensor, k: int, log_z: float, generator: torch.Generator,
                    chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-point estimates (float64) of `importance_estimates` (elbo, iwae, eq3, eq4) with K = k samples."""
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        mean, logvar = model.encode(xb)
        eps = torch.randn((k, *mean.shape), generator=generator)
        z = mean + torch.exp(0.5 * logvar) * eps  # (k, n, d)
        lp = model.log_px_z(xb.expand(k, *xb.shape).reshape(-1, 2), z.reshape(-1, z.shape[-1])).reshape(k, -1)
        en = model.grbm.energy(z.reshape(-1, z.shape[-1])).reshape(k, -1)
        lq = gaussian_log_prob(z, mean, logvar)
        for name, v in importance_estimates(lp.T, en.T, lq.T, log_z).items():
            out.setdefault(name, []).append(v)
    return {name: torch.cat(v) for name, v in out.items()}


def train_row_model(ctx: LL2DContext, c: GRBMVAERowConfig) -> tuple[PointGRBMVAE, dict[str, float]]:
    """Algorithm 1 on ctx.train with validation-based selection; returns (model, selection info)."""
    torch.manual_seed(ctx.seed * 7919 + c.seed_offset)
    model = PointGRBMVAE(c)
    nets = [p for n, p in model.named_parameters() if not n.startswith("grbm.")]
    opt = torch.optim.Adam([{"params": nets, "lr": c.lr}, {"params": list(model.grbm.parameters()), "lr": c.prior_lr}])
    floor = c.lr_min_fraction
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s / c.steps, 1))))
    gen = ctx.generator(c.seed_offset)
    val_gen = ctx.generator(c.seed_offset + 1)
    ssm = SSMConfig(variant=c.ssm_variant, projections=c.ssm_projections)
    val = ctx.val[: c.val_points]
    selection = BestState()
    warm = max(1, int(c.warmup * c.steps))
    t0 = time.perf_counter()
    for step in range(c.steps):
        x = ctx.train[torch.randint(len(ctx.train), (c.batch,), generator=gen)]
        mean, logvar = model.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        beta = min(1.0, (step + 1) / warm)
        alb = model.log_px_z(x, z) + beta * (-model.grbm.energy(z, detach_params=True) - gaussian_log_prob(z, mean,
                                                                                                            logvar))
        v = draw_projections((c.batch, c.latent_dim), ssm, gen)
        loss = -alb.mean() + sliced_score_matching(model.grbm.energy, z, v, ssm.variant).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if beta == 1.0 and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps):
            with torch.no_grad():
                log_z = float(exact_log_partition(model.grbm.params(detach=True).to(torch.float64)))
                score = float(log_likelihoods(model, val, 16, log_z, val_gen)["iwae"].mean())
            selection.consider(step + 1, score, model)
            log.info("grbm_vae row: step %d/%d  val log p %.4f (best %.4f at %d)  log Z %.3f  (%.0f s)", step + 1,
                     c.steps, score, selection.score, selection.step, log_z, time.perf_counter() - t0)
    selection.restore(model)
    info = {**selection.summary(), "train_seconds": time.perf_counter() - t0}
    return model.eval().requires_grad_(False), info


def ll2d_row(ctx: LL2DContext, config: GRBMVAERowConfig) -> LL2DRow:
    config.validate()
    c = config
    cache = ctx.cache_path(f"grbm_vae-{_key(c)}")

    def train() -> dict:
        model, info = train_row_model(ctx, c)
        return {"state": model.state_dict(), "info": info}

    blob = load_or_train(cache, train, required=("state", "info"))
    model = PointGRBMVAE(c)
    model.load_state_dict(blob["state"], strict=True)
    model = model.eval().requires_grad_(False)
    info = {k: float(v) for k, v in blob["info"].items()}
    params = model.grbm.params(detach=True).to(torch.float64)
    log_z = float(exact_log_partition(params))
    ais = ais_log_partition(params, AISConfig(chains=c.ais_chains, betas=c.ais_betas), ctx.generator(c.seed_offset + 2))
    est = log_likelihoods(model, ctx.test, c.importance_samples, log_z, ctx.generator(c.seed_offset + 3))
    # Side by side on the first extra_points test points: the paper's estimators (Eq. 3, Eq. 4, Algorithm 2).
    n = min(c.extra_points, len(ctx.test))
    sub = {k: v[:n] for k, v in est.items()}
    gen = ctx.generator(c.seed_offset + 4)
    z0 = params.mu + torch.exp(params.log_sigma) * torch.randn(c.classifier_prior_samples, c.latent_dim,
                                                               generator=gen, dtype=torch.float64)
    prior = gibbs_sample(params, z0, c.gibbs_sweeps, gen).float()

    def z_post(xb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        mean, logvar = model.encode(xb)
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)

    clf = train_ratio_classifier(ctx.train, z_post, prior, ClassifierConfig(steps=c.classifier_steps), gen)
    with torch.no_grad():
        xt = ctx.test[:n]
        vals = [model.log_px_z(xt, zq) - clf(xt, zq) for zq in (z_post(xt, gen) for _ in range(8))]
        clf_elbo = torch.stack(vals).double().mean(0)
    extra = {
        "log_z_exact": log_z, "log_z_ais": ais.log_z, "log_z_ais_stderr": ais.stderr, "ais_ess": ais.ess,
        "elbo_exact_log_z": float(sub["elbo"].mean()), "iwae_subset": float(sub["iwae"].mean()),
        "eq3_self_normalized": float(sub["eq3"].mean()), "eq4_self_normalized": float(sub["eq4"].mean()),
        "classifier_elbo": float(clf_elbo.mean()), "extra_points": float(n),
        "grbm_hidden": float(c.grbm_hidden), **info,
    }
    return LL2DRow(log_likelihood=est["iwae"], log_z=log_z, log_z_stderr=0.0, log_z_check=ais.log_z, extra=extra)


__all__ = ["GRBMVAERowConfig", "ll2d_row", "PointGRBMVAE", "train_row_model", "log_likelihoods"]
