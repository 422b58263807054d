"""ε-space potentials and decoding shared by the methods on a noise-space backbone (vaebm.md Eq. 8-9, App. B).

`core.sampling.langevin` samples exp(-U) for any potential U; this module builds U for VAEBM's pixel-space energy
(`make_vaebm_potential`, state [eps_x, *eps_z]) and for energies on the latent groups (`make_latent_potential`,
state eps_z: NCP-VAE's -sum_k log r_k and the joint latent EBM prior's -f_alpha).

The state layout is [eps_x, eps_z_1, ..., eps_z_L] (coarsest group first, as the backbone orders them).

- "exact" (default, DESIGN.md): U = E_ψ(T(ε)) + ½‖ε_x‖² + ½Σ_l‖ε_z,l‖², the base distribution of vaebm.md Eq. 9,
  derived in App. B (Eq. 14-20): the Jacobian of T cancels against that of T⁻¹, so no log σ terms appear.
- "joint": U = E_ψ(x) − log p(z) − log p(x|z) at (x, z) = T(ε). In ε this is the exact potential plus
  Σ log σ_z,l(z_<l) + Σ log σ_x(z) (+ constants), i.e. it samples the VAEBM density with an extra factor
  1/|det J_T|.
- "reference": what the official VAEBM code computes, for comparison with published numbers: the "joint" target
  with the decoder sample clamped to [-1, 1] (E_ψ and log p(x|z) see the clamped pixels; x- too) and the decoder's
  log σ_x floored at −2 inside log p(x|z) only (σ_x = max(σ, e^-2 + min_sigma) there; the sample keeps the
  unfloored σ). On a sharp decoder the floor shrinks the ε_x drift by σ²/σ_floor². Never a default.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch

from core.models.distributions import DiagNormal, sum_except_batch
from core.models.interface import NoiseSpaceBackbone
from core.sampling.langevin import PotentialTerms, SplitPotential, frozen

TargetMode = Literal["exact", "joint", "reference"]
TARGET_MODES: tuple[str, ...] = ("exact", "joint", "reference")
REFERENCE_LOG_SIGMA_FLOOR = -2.0  # the official code's floor on the decoder's log-scale inside log p(x|z)


def join_state(eps_x: torch.Tensor, eps_z: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Langevin state [eps_x, *eps_z] of a VAEBM chain."""
    return [eps_x, *eps_z]


def split_state(state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inverse of `join_state`: (eps_x, eps_z)."""
    return state[0], list(state[1:])


def _half_sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample ½‖t‖² = −log N(t; 0, I) + const, in fp32 (the state is fp32; autocast leaves pow/sum alone)."""
    return 0.5 * sum_except_batch(t.float().pow(2))


def make_vaebm_potential(backbone: NoiseSpaceBackbone, energy_fn: Callable[[torch.Tensor], torch.Tensor],
                         mode: TargetMode = "exact", temperature: float = 1.0,
                         use_mean: bool = False) -> SplitPotential:
    """U([eps_x, *eps_z]) -> (batch,) for VAEBM sampling in (ε_x, ε_z)-space (vaebm.md Eq. 9, App. B).

    backbone: frozen noise-space VAE; T(ε) = backbone.generate(eps_z, eps_x, temperature) (vaebm.md Eq. 8, 11).
    energy_fn: E_ψ, maps a batch of x to (batch,) (or (batch, 1)) energies.
    mode: "exact" (default), "joint" (adds Σ log σ) or "reference" (the official code); see the module docstring.
    temperature: prior temperature t of T_z (z_l = μ_l + t·σ_l·ε_l); the Gaussian terms stay ½‖ε‖² in exact mode.
    use_mean: E_ψ sees the decoder mean μ_x(z) ("negatives from the decoder mean") instead of the sample
        μ_x(z) + σ_x(z)·ε_x. ε_x stays in the state with its N(0, I) term (and, in reference mode, log p(x|z) is
        still taken at the sample, as the official code does), so its chain remains a proper N(0, I) diffusion.
        The official code scores the sample (use_mean=False) during its chains.

    Backbone and energy parameters are frozen (requires_grad=False) while U runs, so a Langevin step backpropagates
    to the state only; the flags are restored afterwards (the energy net is the one being trained). The energy term
    E_ψ (what the chains' diagnostics plot) comes with U through `SplitPotential.terms`.
    """
    if mode not in TARGET_MODES:
        raise ValueError(f"unknown target mode {mode!r}; expected one of {TARGET_MODES}")

    sigma_floor = math.exp(REFERENCE_LOG_SIGMA_FLOOR) + getattr(getattr(backbone, "config", None), "min_sigma", 1e-2)

    def terms(state: list[torch.Tensor]) -> PotentialTerms:
        eps_x, eps_z = split_state(state)
        with frozen(backbone, energy_fn):
            x, tower = backbone.generate(eps_z, eps_x, temperature)  # vaebm.md Eq. 8
            if mode == "reference":
                x = x.clamp(-1.0, 1.0)  # the official decoder sample is clamped to the pixel range
            x_e = tower.x_dist.mu if use_mean else x
            energy = energy_fn(x_e).float().reshape(x_e.shape[0])
            if mode == "exact":  # vaebm.md Eq. 9 / Eq. 20: E_ψ(T(ε)) − log p_ε(ε)
                return PotentialTerms(energy + _half_sq_norm(eps_x) + sum(_half_sq_norm(e) for e in eps_z), energy)
            # E_ψ(x) − log p(z) − log p(x|z), both log-densities at the reparameterized sample, evaluated in fp32
            # (log σ and squared residuals lose digits in bf16).
            log_pz = sum(sum_except_batch(g.prior.to(torch.float32).log_prob(g.z.float())) for g in tower.groups)
            p_x = tower.x_dist.to(torch.float32)
            if mode == "reference":
                p_x = DiagNormal(p_x.mu, p_x.sigma.clamp(min=sigma_floor))
            return PotentialTerms(energy - log_pz - sum_except_batch(p_x.log_prob(x.float())), energy)

    return SplitPotential(terms)


def make_latent_potential(backbone: NoiseSpaceBackbone, latent_energy: Callable[[object], torch.Tensor],
                          temperature: float = 1.0, modules: tuple[object, ...] = ()) -> SplitPotential:
    """U(eps_z) -> (batch,) for priors reweighted on the latent groups, sampled in eps_z-space.

    The prior is p(z) exp(-E(z)) / Z with p(z) the backbone's hierarchical Gaussian prior and z = T_z(eps_z). As in
    vaebm.md Eq. 9 (App. B), the Jacobian of T_z cancels, so the eps_z-space target is
        U(eps_z) = E(T_z(eps_z)) + 1/2 sum_l ||eps_z,l||^2
    (joint_latent_ebm_prior.md App. A.3 with E = -f_alpha; ncpvae_appendix.md with E = -sum_k log r_k).

    latent_energy: maps the walk `TowerPass` of T_z (groups with z_l and the decoder context before each group) to
        (batch,) energies E(z).
    temperature: prior temperature t of T_z (z_l = mu_l + t sigma_l eps_l); the Gaussian term stays 1/2 ||eps||^2.
    modules: networks inside `latent_energy` whose parameters are frozen while U runs (the backbone always is).
    The energy term E(z) comes with U through `SplitPotential.terms` (the chains' diagnostics).
    """
    def terms(state: list[torch.Tensor]) -> PotentialTerms:
        with frozen(backbone, *modules):
            tower = backbone.T_z(list(state), temperature)
            energy = latent_energy(tower).float().reshape(state[0].shape[0])
            return PotentialTerms(energy + sum(_half_sq_norm(e) for e in state), energy)

    return SplitPotential(terms)


def decode(backbone: NoiseSpaceBackbone, state: list[torch.Tensor], temperature: float = 1.0,
           use_mean: bool = True) -> torch.Tensor:
    """x = T(eps) (vaebm.md Eq. 8, 11) as fp32 images: the decoder mean mu_x(z) or the decoder sample
    mu_x(z) + sigma_x(z) eps_x. The one place that chooses between them."""
    eps_x, eps_z = split_state(state)
    x, tower = backbone.generate(eps_z, eps_x, temperature)
    return (tower.x_dist.mu if use_mean else x).float()


@torch.no_grad()
def readjusted_bn_sample(backbone, batch: int, temperature: float, iterations: int,
                         generator: torch.Generator) -> torch.Tensor:
    """x from the VAE at `temperature` with BN statistics re-estimated at that temperature (NVAE Sec. 5).

    The backbone's own statistics are restored before returning.
    """
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the re-estimation passes
            m.train()
        for _ in range(iterations):
            eps_x, eps_z = backbone.sample_noise(batch, generator=generator)
            backbone.generate(eps_z, eps_x, temperature)
        for m in bns:
            m.eval()
        eps_x, eps_z = backbone.sample_noise(batch, generator=generator)
        return backbone.T_z(eps_z, temperature).x_dist.mu
    finally:
        for m, (mean, var, momentum) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.momentum = momentum
            m.eval()


@torch.no_grad()
def low_temperature_init(backbone, batch: int, temperature: float, bn_iterations: int,
                         generator: torch.Generator) -> list[torch.Tensor]:
    """Chain start of vaebm.md App. E: encode a low-temperature sample and invert (x, z) to (eps_x, eps_z)."""
    x = readjusted_bn_sample(backbone, batch, temperature, bn_iterations, generator)
    tower = backbone.posterior(x)
    eps_x, eps_z = backbone.inverse(x, tower.z)
    return join_state(eps_x, eps_z)


def chain_start(backbone, n: int, generator: torch.Generator, init: str = "normal", init_temperature: float = 0.7,
                bn_iterations: int = 20) -> list[torch.Tensor]:
    """Initial state [eps_x, *eps_z] of n test-time chains: N(0, I) (`init="normal"`) or the encoded
    low-temperature VAE samples of vaebm.md App. E (`init="low_temperature"`)."""
    if init == "low_temperature":
        return low_temperature_init(backbone, n, init_temperature, bn_iterations, generator)
    device = next(backbone.parameters()).device
    eps_x, eps_z = backbone.sample_noise(n, generator=generator, device=device)
    return join_state(eps_x, eps_z)
