"""The baseline: the official VAEBM and NVAE loops' arithmetic, re-created in fp32 eager PyTorch on this package's
modules (core.models.nvae.NVAE, core.models.energy.EnergyNet), so every speed-up is a ratio measured side by side.

What is reproduced, per loop (from NVlabs/VAEBM train_VAEBM.py, sample_VAEBM.py, thirdparty/igebm_utils.py and
NVlabs/NVAE train.py):
- Langevin step: a full decoder walk from eps_z (`VAE.sample(batch, t, eps_z)`), the decoder sample x = mu + sigma
  eps_x, the potential, `.mean().backward()` into the leaves' `.grad`, then per latent group a fresh `normal_()`
  noise buffer and in-place `eps.data.add_(-eta/2 * grad * batch)` / `add_(sqrt(eta) * noise)`, eps_x last.
  The official potential is E(clamp(x)) - log p(z) - log p(x|z) with the decoder's log sigma floored at -2 inside
  log p(x|z) (target "reference"); target "exact" keeps the official order with E(x) + |eps|^2/2 (vaebm.md Eq. 9),
  so both paths can run either target and stay comparable.
- Energy parameter gradients during training chains: train_VAEBM.py hands `model.parameters()` (a generator) to
  `optim.Adam`, which consumes it, so the later `requires_grad(parameters, False)` freezes nothing and every chain
  step's backward also computes the energy network's weight gradients (cleared by `model.zero_grad()`). The
  sampling script freezes them. Both are reproduced (`energy_param_grads`).
- Stage-2 iteration: chain, one more decoder walk for the negatives (mean with --use_mu_cd), separate energy passes
  on data and negatives, spectral regularizer, backward, the element-wise clip of Du & Mordatch
  (|g| <= 3 sqrt(v_hat) + 0.1 against Adam's state), `optim.Adam.step()`, and the two `.item()` reads per iteration.
- Sampling: one extra no-grad decoder walk to learn the latent shapes, chains with frozen networks, then the decoder
  mean of the final eps.
- NVAE step: zero_grad, model(x), decoder output, reconstruction, the KL balancer, the mean, spectral + BN penalties
  weighted by lambda, backward, Adamax step; fp32 (the official run uses autocast with a grad scaler; the brief of
  this baseline is the fp32 eager arithmetic).

Not reproduced (no arithmetic on the measured path): data loading, logging every 100 steps, checkpoints, the
replay buffer (both paths run non-persistent chains), the learning-rate warm-up's Python loop.
Pixel convention: this package's [-1, 1] (the official VAEBM energy sees [0, 1]); the shapes and FLOPs are the same.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from core.models.interface import TowerPass
from core.objectives.elbo import ELBOConfig, kl_coefficient, norm_coefficient

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_SIGMA_FLOOR = -2.0  # official NormalDecoder.dist1: log sigma clamped at -2 inside log p(x|z)


def _log_normal(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; mu, sigma^2), written as the official Normal.log_p."""
    normalized = (x - mu) / sigma
    return -0.5 * normalized * normalized - _HALF_LOG_2PI - torch.log(sigma)


def _sum_chw(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=list(range(1, t.dim())))


def _potential(backbone, energy, eps_x: torch.Tensor, eps_z: list[torch.Tensor], target: str,
               temperature: float, use_mean: bool = False) -> torch.Tensor:
    """Per-sample potential of one official Langevin step (the `dvalue` before `.mean()`)."""
    tower: TowerPass = backbone.T_z(eps_z, temperature)  # VAE.sample(batch, t, eps_z)
    mu, sigma = tower.x_dist.mu, tower.x_dist.sigma
    x = mu + sigma * eps_x  # output.sample(eps_x)
    if target == "reference":
        x = x.clamp(-1.0, 1.0)
        log_p_total = sum(_sum_chw(_log_normal(g.z, g.prior.mu, g.prior.sigma)) for g in tower.groups)
        floor = math.exp(_LOG_SIGMA_FLOOR) + backbone.config.min_sigma
        log_pxgz = _sum_chw(_log_normal(x, mu, sigma.clamp(min=floor)))
        return energy(mu if use_mean else x).reshape(-1) - log_p_total - log_pxgz
    prior = 0.5 * _sum_chw(eps_x * eps_x) + sum(0.5 * _sum_chw(e * e) for e in eps_z)
    return energy(mu if use_mean else x).reshape(-1) + prior


def official_langevin(backbone, energy, eps_x: torch.Tensor, eps_z: Sequence[torch.Tensor], steps: int,
                      step_size: float, target: str = "exact", temperature: float = 1.0,
                      generator: torch.Generator | None = None, energy_param_grads: bool = True,
                      noise_scale: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official Langevin loop (train_VAEBM.py / sample_VAEBM.py); returns the final (eps_x, eps_z), detached.
    `noise_scale` multiplies sqrt(eta) * noise (0: the drift alone, for comparisons on identical inputs)."""
    batch = eps_x.shape[0]
    eps_z = [e.detach().clone().requires_grad_(True) for e in eps_z]
    eps_x = eps_x.detach().clone().requires_grad_(True)
    noise_z = [torch.empty_like(e) for e in eps_z]
    noise_x = torch.empty_like(eps_x)
    flags = [p.requires_grad for p in energy.parameters()]
    energy.requires_grad_(energy_param_grads)
    try:
        for _ in range(steps):
            dvalue = _potential(backbone, energy, eps_x, eps_z, target, temperature).mean()
            dvalue.backward()
            for e, n in zip(eps_z, noise_z):  # update z group by group
                n.normal_(0, 1, generator=generator)
                e.data.add_(e.grad.data * batch, alpha=-0.5 * step_size)
                e.data.add_(n.data, alpha=noise_scale * math.sqrt(step_size))
                e.grad.detach_()
                e.grad.zero_()
            noise_x.normal_(0, 1, generator=generator)
            eps_x.data.add_(eps_x.grad.data * batch, alpha=-0.5 * step_size)
            eps_x.data.add_(noise_x.data, alpha=noise_scale * math.sqrt(step_size))
            eps_x.grad.detach_()
            eps_x.grad.zero_()
    finally:
        for p, f in zip(energy.parameters(), flags):
            p.requires_grad_(f)
    return eps_x.detach(), [e.detach() for e in eps_z]


def clip_grad_official(optimizer: torch.optim.Adam, clip_std: float = 3.0, slack: float = 0.1) -> None:
    """igebm_utils.clip_grad: clamp each gradient to 3 sqrt(v / (1 - beta2^step)) + 0.1 once Adam has stepped."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            _, beta2 = group["betas"]
            for p in group["params"]:
                state = optimizer.state[p]
                if "step" not in state or state["step"] < 1:
                    continue
                step = float(state["step"])
                bound = clip_std * torch.sqrt(state["exp_avg_sq"] / (1 - beta2 ** step)) + slack
                p.grad.data.copy_(torch.max(torch.min(p.grad.data, bound), -bound))


def official_vaebm_iteration(backbone, energy, optimizer: torch.optim.Adam, x_pos: torch.Tensor,
                             eps_x: torch.Tensor, eps_z: Sequence[torch.Tensor], steps: int, step_size: float,
                             alpha_s: float, target: str = "exact", temperature: float = 1.0,
                             use_mean: bool = False, generator: torch.Generator | None = None,
                             noise_scale: float = 1.0) -> torch.Tensor:
    """One training iteration of train_VAEBM.py from given chain starts; returns the loss (CD + alpha_s * SR)."""
    eps_x, eps_z = official_langevin(backbone, energy, eps_x, eps_z, steps, step_size, target, temperature,
                                     generator, energy_param_grads=True, noise_scale=noise_scale)
    energy.zero_grad()
    tower = backbone.T_z(eps_z, temperature)
    if use_mean:
        neg_x = tower.x_dist.mu
    else:
        neg_x = tower.x_dist.mu + tower.x_dist.sigma * eps_x
        if target == "reference":
            neg_x = neg_x.clamp(-1.0, 1.0)
    pos_out = energy(x_pos).reshape(-1)
    neg_out = energy(neg_x).reshape(-1)
    norm_loss = energy.spectral_penalty()
    loss = pos_out.mean() - neg_out.mean()
    loss_total = loss + alpha_s * norm_loss
    loss_total.backward()
    clip_grad_official(optimizer)
    optimizer.step()
    loss.mean().item()  # loader.set_description(f'loss: {loss.mean().item():.5f}')
    (pos_out.mean() - neg_out.mean()).item()  # d_s_t.append(loss_print.item())
    return loss_total.detach()


@torch.no_grad()
def _shape_probe(backbone, batch: int, temperature: float) -> None:
    """sample_VAEBM.py's `_, z_list, _ = VAE.sample(batch, t)` (a whole decoder walk to learn the group shapes)."""
    _, eps_z = backbone.sample_noise(batch)
    backbone.T_z(eps_z, temperature)


def official_sample(backbone, energy, batch: int, steps: int, step_size: float, target: str = "exact",
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    noise_scale: float = 1.0) -> torch.Tensor:
    """sample_from_EBM of sample_VAEBM.py: N(0, I) starts (eps_z groups, then eps_x, from `generator`), chains with
    frozen networks, images = decoder mean of the final eps."""
    _shape_probe(backbone, batch, temperature)
    device = next(backbone.parameters()).device
    eps_z = [torch.randn((batch, *s), generator=generator, device=device) for s in backbone.latent_shapes()]
    eps_x = torch.randn((batch, *backbone.x_shape()), generator=generator, device=device)
    eps_x, eps_z = official_langevin(backbone, energy, eps_x, eps_z, steps, step_size, target, temperature,
                                     generator, energy_param_grads=False, noise_scale=noise_scale)
    with torch.no_grad():
        return backbone.T_z(eps_z, temperature).x_dist.mu


class OfficialNVAEStep:
    """One stage-1 step in the order of NVlabs/NVAE train.py, in fp32."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, alpha: torch.Tensor, objective: ELBOConfig,
                 progress: float):
        self.model, self.optimizer, self.alpha = model, optimizer, alpha
        self.kl_coeff = kl_coefficient(progress, objective)  # utils.kl_coeff(global_step, ...)
        self.wdn_coeff = norm_coefficient(self.kl_coeff, objective)
        self.kl_balance = objective.kl_balance

    def _kl_all(self, tower: TowerPass) -> list[torch.Tensor]:
        """Per-group KL summed over C, H, W: analytic (Normal.kl), or log q - log p at the sample with flow cells."""
        kl = []
        for g in tower.groups:
            q, p = g.posterior, g.prior
            if g.z_q is None:
                term1 = (q.mu - p.mu) / p.sigma
                term2 = q.sigma / p.sigma
                kl.append(_sum_chw(0.5 * (term1 * term1 + term2 * term2) - 0.5 - torch.log(term2)))
            else:
                kl.append(_sum_chw(_log_normal(g.z_q, q.mu, q.sigma) - _log_normal(g.z, p.mu, p.sigma)))
        return kl

    def _kl_balancer(self, kl_all: list[torch.Tensor]) -> torch.Tensor:
        """utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i)."""
        kl_all = torch.stack(kl_all, dim=1)
        if self.kl_balance and self.kl_coeff < 1.0:
            alpha_i = self.alpha.unsqueeze(0)
            kl_coeff_i = torch.mean(torch.abs(kl_all), dim=0, keepdim=True) + 0.01  # kl_per_group
            total_kl = torch.sum(kl_coeff_i)
            kl_coeff_i = kl_coeff_i / alpha_i * total_kl
            kl_coeff_i = kl_coeff_i / torch.mean(kl_coeff_i, dim=1, keepdim=True)
            kl = torch.sum(kl_all * kl_coeff_i.detach(), dim=1)
        else:
            kl = torch.sum(kl_all, dim=1)
        return self.kl_coeff * kl

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        tower = self.model(x)  # logits, log_q, log_p, kl_all, kl_diag = model(x)
        output = tower.x_dist  # model.decoder_output(logits)
        recon_loss = -_sum_chw(_log_normal(x, output.mu, output.sigma))
        balanced_kl = self._kl_balancer(self._kl_all(tower))
        loss = torch.mean(recon_loss + balanced_kl)
        norm_loss = self.model.spectral_penalty()  # model.spectral_norm_parallel()
        bn_loss = self.model.batchnorm_penalty()
        loss = loss + norm_loss * self.wdn_coeff + bn_loss * self.wdn_coeff
        loss.backward()
        self.optimizer.step()
        return loss.detach()
