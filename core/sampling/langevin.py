"""The one Langevin dynamics implementation (vaebm.md Eq. 2), run on any potential U(state) -> per-sample energy.

It knows nothing about VAEs: stage-2 methods build a potential over their noise-space state (for VAEBM the
ε-space target of vaebm.md Eq. 9, see `core.methods.potentials`) and call `run_langevin`. The state is a list of
batch-first tensors (e.g. [eps_x, eps_z_1, ..., eps_z_L]) that is always kept in fp32: steps of η/2·∇U ≈ 1e-6 on
values ≈ 1 vanish in bf16 (8-bit mantissa, spacing 2^-7 near 1), so only the networks inside U run under autocast.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

Potential = Callable[[list[torch.Tensor]], torch.Tensor]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                    "float16": torch.float16}


@dataclass
class LangevinConfig:
    num_steps: int = 10  # Langevin updates per call (vaebm.md Table 8: 6-10 in training, 16-24 at test time)
    step_size: float = 8e-5  # η of vaebm.md Eq. 2: drift -(η/2)∇U, noise √η·ω (Table 8: 3e-6 .. 8e-5)
    noise_scale: float = 1.0  # multiplies √η·ω; 1.0 samples exp(-U), < 1 is "cold" sampling (biased, opt-in)
    autocast: str | None = None  # "bf16" / "fp16": dtype the potential's networks run in; None = plain fp32
    record_every: int = 0  # keep a copy of the state every k steps (chain strips); 0 = record nothing
    reset_nonfinite: bool = True  # restart chains that hit NaN/Inf from their initial state instead of keeping them

    def __post_init__(self) -> None:
        if self.num_steps < 0 or self.step_size <= 0 or self.noise_scale < 0 or self.record_every < 0:
            raise ValueError("LangevinConfig: need num_steps >= 0, step_size > 0, noise_scale >= 0, "
                             "record_every >= 0")
        if self.autocast is not None and self.autocast not in _AUTOCAST_DTYPES:
            raise ValueError(f"LangevinConfig.autocast must be one of {sorted(_AUTOCAST_DTYPES)} or None, "
                             f"got {self.autocast!r}")


@dataclass
class LangevinResult:
    state: list[torch.Tensor]  # final state, fp32, detached
    energy: torch.Tensor  # (num_steps,) mean U over finite chains at the state each update started from
    grad_norm: torch.Tensor  # (num_steps,) mean per-sample ‖∇U‖ (all state tensors together) over finite chains
    snapshots: list[list[torch.Tensor]] = field(default_factory=list)  # recorded states (detached clones)
    snapshot_steps: list[int] = field(default_factory=list)  # number of updates applied before each snapshot
    nonfinite: torch.Tensor | None = None  # (batch,) bool: chains that produced a non-finite value at some step

    @property
    def num_nonfinite(self) -> int:
        """How many chains went non-finite (each counted once however often it happened)."""
        return 0 if self.nonfinite is None else int(self.nonfinite.sum())


def autocast_context(device_type: str, autocast: str | None) -> contextlib.AbstractContextManager:
    """Autocast for the networks inside a potential; a no-op context when `autocast` is None."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[autocast])


@contextlib.contextmanager
def frozen(*modules: object) -> Iterator[None]:
    """Temporarily set requires_grad=False on the parameters of the given modules (non-modules are ignored).

    Used while a potential runs: its graph then carries gradients to the state only, so the backward of a Langevin
    step never computes parameter gradients, and the flags (e.g. of the energy net being trained) are restored.
    """
    params = [p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def energy_and_grad(potential: Potential, state: Sequence[torch.Tensor],
                    autocast: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample U(state) (fp32, detached) and ∇U (fp32), one forward and one backward.

    The drift is ∂(Σ_b U_b)/∂state: U_b depends on sample b only, so row b of the gradient is ∇U_b whatever the
    batch size (no 1/B from a mean, unlike the official code which multiplies the mean's gradient back by B).
    """
    leaves = [s.detach().requires_grad_(True) for s in state]
    with torch.enable_grad():
        with autocast_context(leaves[0].device.type, autocast):
            u = potential(leaves)
        u = u.float()  # the reduction and the energy statistics run in fp32 whatever the networks used
        if u.shape != (leaves[0].shape[0],):
            raise ValueError(f"potential must return per-sample energies of shape ({leaves[0].shape[0]},), "
                             f"got {tuple(u.shape)}")
        # materialize_grads: a state tensor U ignores gets a zero drift (pure diffusion) instead of an error.
        grads = torch.autograd.grad(u.sum(), leaves, allow_unused=True, materialize_grads=True)
    return u.detach(), [g.float() for g in grads]  # fp32 leaves give fp32 grads; the cast documents the contract


def langevin_update(state: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], noise: Sequence[torch.Tensor],
                    step_size: float, noise_scale: float = 1.0) -> list[torch.Tensor]:
    """s ← s − (η/2)∇U(s) + noise_scale·√η·ω (vaebm.md Eq. 2 applied to the target of Eq. 9), all in fp32."""
    amp = noise_scale * step_size**0.5
    return [s - 0.5 * step_size * g + amp * w for s, g, w in zip(state, grads, noise)]


def _per_sample(ts: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([fn(t.reshape(t.shape[0], -1)) for t in ts], dim=0)


def run_langevin(potential: Potential, init_state: Sequence[torch.Tensor], config: LangevinConfig,
                 generator: torch.Generator | None = None) -> LangevinResult:
    """Run `config.num_steps` Langevin updates of every chain in `init_state` (a list of batch-first tensors).

    `generator` draws the noise ω (on the state's device); give each rank its own (`core.sampling.rank_generator`)
    so ranks draw different chains deterministically. The potential must return one energy per sample and must not
    mix samples (networks in eval mode), otherwise drift and non-finite isolation stop being per-sample.
    """
    if not init_state:
        raise ValueError("run_langevin: empty state")
    init = [s.detach().float().clone() for s in init_state]  # fp32 always (DESIGN.md "Langevin state in fp32")
    batch, device = init[0].shape[0], init[0].device
    if any(s.shape[0] != batch for s in init):
        raise ValueError("run_langevin: every state tensor must have the same batch size")
    state = [s.clone() for s in init]
    energies, grad_norms = [], []
    bad = torch.zeros(batch, dtype=torch.bool, device=device)
    snapshots: list[list[torch.Tensor]] = []
    snapshot_steps: list[int] = []

    def record(step: int) -> None:
        snapshots.append([s.detach().clone() for s in state])
        snapshot_steps.append(step)

    if config.record_every:
        record(0)
    for step in range(config.num_steps):
        u, grads = energy_and_grad(potential, state, config.autocast)
        noise = [torch.randn(s.shape, generator=generator, device=device, dtype=torch.float32) for s in state]
        new_state = langevin_update(state, grads, noise, config.step_size, config.noise_scale)
        # A chain is bad at this step if its energy, its gradient or its new state is non-finite.
        finite = torch.isfinite(u) & _per_sample(grads, lambda t: torch.isfinite(t).all(1)).all(0)
        finite &= _per_sample(new_state, lambda t: torch.isfinite(t).all(1)).all(0)
        gnorm = _per_sample(grads, lambda t: t.pow(2).sum(1)).sum(0).sqrt()
        n_ok = finite.sum().clamp(min=1)
        energies.append(torch.where(finite, u, 0.0).sum() / n_ok)
        grad_norms.append(torch.where(finite, gnorm, 0.0).sum() / n_ok)
        bad |= ~finite
        if config.reset_nonfinite:
            # Only the failing rows restart; the rest of the batch is untouched (no poisoning through the mean).
            keep = ~finite
            new_state = [torch.where(keep.view(-1, *[1] * (s.dim() - 1)), i, s) for s, i in zip(new_state, init)]
        state = new_state
        if config.record_every and ((step + 1) % config.record_every == 0 or step + 1 == config.num_steps):
            record(step + 1)
    empty = torch.zeros(0, device=device)
    return LangevinResult(state=[s.detach() for s in state],
                          energy=torch.stack(energies) if energies else empty,
                          grad_norm=torch.stack(grad_norms) if grad_norms else empty,
                          snapshots=snapshots, snapshot_steps=snapshot_steps, nonfinite=bad)
