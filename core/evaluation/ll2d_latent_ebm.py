"""The joint latent EBM prior's row of the 2-D likelihood protocol (`metric=ll2d`, core/evaluation/toy2d.py).

On the protocol's frozen MLP VAE (one 20-d latent group, p(z) = N(0, I)) the prior is tilted to
p_alpha(z) = exp(f_alpha(z)) p(z) / Z (joint_latent_ebm_prior.md Eq. 6 with one group) and f_alpha is trained by the
method's own pieces (core.methods.latent_ebm): positives z+ ~ q(z|x) of the frozen encoder, negatives by eps_z
Langevin on U = -f_alpha(T_z(eps)) + 1/2 ||eps||^2 (App. A.3) from SIR starts, the CD loss whose gradient is Eq. 17.
The network is Table 12's MLP energy for vector latents (Linear(hidden) + LReLU(0.2) layers, Linear(1)).

Likelihood of a test point (nats):
    log p(x) = log E_{z~p}[p(x|z) exp(f(z))] - log Z,   log Z = log E_{z~p}[exp(f(z))]
- the first term by the protocol's M shared decoder components, `ctx.log_mixture(x, log_weights=f(z_m))`;
- log Z by n = `log_z_samples` fresh prior draws (20k, the count of ncpvae_appendix.md App. J), standard error by the
  delta method, se(log Zhat) = sd(w) / (sqrt(n) mean(w)) with w = exp(f);
- cross-check (`log_z_check`): the grid integral of the unnormalized density log int (1/M) sum_m exp(f(z_m))
  N(x; mu_m, sigma_m^2) dx, i.e. quadrature over x instead of Monte Carlo over z, on the shared components.
The checkpoint kept is the one with the best validation log-likelihood (scored every `eval_every` steps on the
validation split with the first `val_components` shared components, self-normalized); test points choose nothing.
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

from core.evaluation.ll2d_seam import BestState, LL2DContext, LL2DRow, load_or_train
from core.methods.latent_ebm import latent_negatives, sir_latent_start
from core.models.latent_energy import LatentEnergy, LatentEnergyConfig
from core.objectives.ebm import vaebm_loss
from core.sampling.langevin import LangevinConfig

log = logging.getLogger("vaebm.evaluation.ll2d_latent_ebm")


@dataclass
class LatentEBMRowConfig:
    hidden: int = 200  # width of f_alpha's hidden layers (Table 12's MLP energies: Linear(200))
    num_linear: int = 3  # hidden Linear + LReLU(0.2) layers before Linear(1)
    # multiplies the first layer's default initial weights: only 2 of the 20 latent dimensions carry information and
    # the aggregate posterior has bumps ~0.25 wide there, which PyTorch's default scale (1/sqrt(20)) is far too
    # smooth to resolve (the VAEBM row scales its first layer for the same reason: `energy.init_scales` of its preset)
    first_layer_scale: float = 1.0
    # f sees only the latent units the encoder uses (mean KL(q(z_j|x) || p(z_j)) above this, nats, on 2,000
    # training points); 0: all units. Along an unused unit q(z_j|x) = p(z_j), so q_agg / p is constant there and
    # f loses nothing; measured on this VAE (2 of 20 units used): with all 20 inputs the MLP learns nothing in
    # 1,000 steps (even a q-vs-p logistic classifier stays at chance), on the 2 used units it learns in 100.
    active_kl_threshold: float = 0.01
    steps: int = 1000  # optimizer steps
    batch: int = 256  # data points (one posterior sample each) and Langevin chains per step
    lr: float = 2e-3  # Adam learning rate (constant)
    beta1: float = 0.5  # Adam beta1 (beta2 = 0.999)
    langevin_steps: int = 5  # eps_z Langevin updates per step, after the SIR start
    step_size: float = 0.05  # Langevin eta in eps_z space
    init_candidates: int = 16  # chains start at SIR draws from K N(0, I) candidates per chain, weighted by exp(f)
    magnitude_weight: float = 0.0  # energy-magnitude penalty weight (core.objectives.ebm; 0: plain Eq. 17)
    eval_every: int = 100  # steps between validation scores
    val_components: int = 20_000  # shared decoder components used by the validation score
    log_z_samples: int = 20_000  # prior draws of the Monte Carlo log Z (ncpvae_appendix.md App. J: 20k)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 0 or (v == 0 and f.name not in ("magnitude_weight", "active_kl_threshold")):
                raise ValueError(f"ll2d latent_ebm: {f.name} must be > 0, got {v}")
        if not 0.0 <= self.beta1 < 1.0:
            raise ValueError("ll2d latent_ebm: beta1 must be in [0, 1)")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class ActiveUnitsEnergy(torch.nn.Module):
    """f_alpha(z) = g(z[:, active]) for the single latent group of the MLP VAE: a LatentEnergy on the used units."""

    def __init__(self, inner: LatentEnergy, active: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("active", active)

    def forward(self, z: list[torch.Tensor]) -> torch.Tensor:
        return self.inner([z[0][:, self.active]])

    def f(self, z: list[torch.Tensor]) -> torch.Tensor:
        return self(z).sum(dim=1)


@torch.no_grad()
def active_units(ctx: LL2DContext, threshold: float) -> torch.Tensor:
    """Indices of the latent units whose mean KL(q(z_j|x) || p(z_j)) on 2,000 training points exceeds threshold."""
    tower = ctx.vae.posterior(ctx.train[:2000])
    kl = tower.groups[0].posterior.kl(tower.groups[0].prior).mean(0)
    idx = torch.nonzero(kl > threshold).flatten() if threshold > 0 else torch.arange(kl.numel())
    return idx if idx.numel() else torch.arange(kl.numel())


def build_energy(ctx: LL2DContext, config: LatentEBMRowConfig, active: torch.Tensor | None = None):
    if len(ctx.vae.latent_shapes()) != 1:
        raise ValueError("the ll2d latent_ebm row expects the protocol's one-group MLP VAE")
    active = active_units(ctx, config.active_kl_threshold) if active is None else active
    inner = LatentEnergy(LatentEnergyConfig(hidden=config.hidden, num_linear=config.num_linear),
                         [(int(active.numel()),)])
    with torch.no_grad():
        first = next(m for m in inner.modules() if isinstance(m, torch.nn.Linear))
        first.weight.mul_(config.first_layer_scale)
        first.bias.mul_(config.first_layer_scale)
    return ActiveUnitsEnergy(inner, active)


@torch.no_grad()
def tilt(energy, z: list[torch.Tensor], chunk: int = 65536) -> torch.Tensor:
    """log r(z) = f_alpha(z), float64, for (M, d) groups in chunks."""
    n = z[0].shape[0]
    return torch.cat([energy.f([g[i:i + chunk] for g in z]).double() for i in range(0, n, chunk)])


def mc_log_partition(energy, ctx: LL2DContext, n: int, generator: torch.Generator
                     ) -> tuple[float, float]:
    """log Z = log E_{z~p}[exp f(z)] from n fresh prior draws, and its delta-method standard error."""
    with torch.no_grad():
        _, eps_z = ctx.vae.sample_noise(n, generator=generator)
        f = tilt(energy, ctx.vae.T_z(eps_z).z)
    log_z = float(torch.logsumexp(f, 0)) - math.log(n)
    w = torch.exp(f - f.max())
    return log_z, float(w.std() / (math.sqrt(n) * w.mean()))


class _Validation:
    """Self-normalized validation log-likelihood on the first `val_components` shared components."""

    def __init__(self, ctx: LL2DContext, config: LatentEBMRowConfig):
        m = min(config.val_components, ctx.mu.shape[0])
        self.ctx, self.mu, self.sigma = ctx, ctx.mu[:m], ctx.sigma[:m]
        self.z = [g[:m] for g in ctx.z]
        self.best = BestState()

    def consider(self, step: int, energy) -> float:
        log_w = tilt(energy, self.z)
        lp = self.ctx.mixture_fn(self.ctx.val, self.mu, self.sigma, log_weights=log_w)
        value = float(lp.mean()) - (float(torch.logsumexp(log_w, 0)) - math.log(len(log_w)))
        self.best.consider(step, value, energy)
        return value


def train_row_energy(ctx: LL2DContext, config: LatentEBMRowConfig) -> tuple[ActiveUnitsEnergy, dict[str, float]]:
    """f_alpha trained by Eq. 17 on the frozen VAE (see the module docstring); the validation-best weights."""
    vae = ctx.vae
    torch.manual_seed(ctx.seed + 7)
    energy = build_energy(ctx, config)
    gen = ctx.generator(0x1A7)
    opt = torch.optim.Adam(energy.parameters(), lr=config.lr, betas=(config.beta1, 0.999))
    lcfg = LangevinConfig(num_steps=config.langevin_steps, step_size=config.step_size)
    selection = _Validation(ctx, config)
    selection.consider(0, energy)
    t0 = time.perf_counter()
    for step in range(config.steps):
        x = ctx.train[torch.randint(len(ctx.train), (config.batch,), generator=gen)]
        with torch.no_grad():
            eps_q = [torch.randn((config.batch, *s), generator=gen) for s in vae.latent_shapes()]
            z_pos = vae.posterior(x, eps_z=eps_q).z
        init = sir_latent_start(vae, energy, lambda n: vae.sample_noise(n, generator=gen)[1], config.batch,
                                config.init_candidates, gen)
        chains = latent_negatives(vae, energy, init.state, lcfg, gen)
        with torch.no_grad():
            z_neg = vae.T_z(chains.state).z
        f = energy([torch.cat([p, n]) for p, n in zip(z_pos, z_neg)]).sum(1)
        f_pos, f_neg = f.chunk(2)
        terms = vaebm_loss(-f_pos, -f_neg, torch.zeros(()), 0.0, config.magnitude_weight)  # E = -f: -(Eq. 17)
        opt.zero_grad(set_to_none=True)
        terms.loss.backward()
        opt.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            value = selection.consider(done, energy)
            log.info("latent_ebm step %d/%d  f(z+) %.3f  f(z-) %.3f  init ess %.3f  val ll %.4f (best %.4f at %d)  "
                     "(%.0f s)", done, config.steps, -float(terms.e_pos), -float(terms.e_neg), init.ess_fraction,
                     value, selection.best.score, selection.best.step, time.perf_counter() - t0)
    selection.best.restore(energy)
    summary = {**selection.best.summary(), "train_s": time.perf_counter() - t0,
               "active_units": float(energy.active.numel())}
    return energy.eval().requires_grad_(False), summary


def ll2d_row(ctx: LL2DContext, config: LatentEBMRowConfig) -> LL2DRow:
    """Train (or reuse from the context's cache) f_alpha and score the test points (module docstring)."""
    config.validate()
    path = ctx.cache_path(f"latent_ebm-{config.key()}")

    def train() -> dict:
        energy, summary = train_row_energy(ctx, config)
        return {"energy": energy.state_dict(), "summary": summary}

    blob = load_or_train(path, train, required=("energy", "summary"))
    energy = build_energy(ctx, config, active=blob["energy"]["active"])
    energy.load_state_dict(blob["energy"], strict=True)
    energy = energy.eval().requires_grad_(False)
    summary = {k: float(v) for k, v in blob["summary"].items()}
    log_w = tilt(energy, ctx.z)  # log r(z_m) = f(z_m) of the shared components
    log_z, log_z_se = mc_log_partition(energy, ctx, config.log_z_samples, ctx.generator(0x1A8))
    log_z_grid = ctx.grid_log_integral(lambda x: ctx.log_mixture(x, log_weights=log_w))
    log_lik = ctx.log_mixture(ctx.test, log_weights=log_w) - log_z
    weights = torch.softmax(log_w, 0)
    extra = {**summary, "log_z_shared_components": float(torch.logsumexp(log_w, 0)) - math.log(len(log_w)),
             "shared_components_ess_fraction": float(1.0 / weights.pow(2).sum()) / len(log_w)}
    return LL2DRow(log_likelihood=log_lik, log_z=log_z, log_z_stderr=log_z_se, log_z_check=log_z_grid, extra=extra)


__all__ = ["ActiveUnitsEnergy", "LatentEBMRowConfig", "active_units", "ll2d_row", "mc_log_partition",
           "train_row_energy"]
