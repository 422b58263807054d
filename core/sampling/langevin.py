"""The one Langevin dynamics implementation (vaebm.md Eq. 2), run on any potential U(state) -> per-sample energy.

It knows nothing about VAEs: stage-2 methods build a potential over their noise-space state (for VAEBM the
ε-space target of vaebm.md Eq. 9, see `core.methods.potentials`) and call `run_langevin`. The state is a list of
batch-first tensors (e.g. [eps_x, eps_z_1, ..., eps_z_L]) that is always kept in fp32: steps of η/2·∇U ≈ 1e-6 on
values ≈ 1 vanish in bf16 (8-bit mantissa, spacing 2^-7 near 1), so only the networks inside U run under autocast.

The step loop never synchronises the host with the device: non-finite chains are handled with `torch.where` on
fixed shapes and every statistic (mean U, ‖∇U‖, the mean and spread of the energy term E, the non-finite mask) stays
a device tensor in `LangevinResult`, read by the caller at report time. With `LangevinConfig.compile` the step
(potential, gradient, update) runs as one `torch.compile` graph without graph breaks; the noise is drawn eagerly
from the caller's generator, so compiled and eager chains draw the same ω.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence, Union

import torch


class PotentialTerms(NamedTuple):
    """What a potential may return instead of a bare U: the total and its energy term E.

    U = E + (Gaussian terms), e.g. E_ψ(T(ε)) + ½‖ε‖² for VAEBM (vaebm.md Eq. 9). The chains follow `total`;
    `energy` is only watched (per-step mean and spread of E over the chains, `LangevinResult.model_energy`), so a
    potential computes U in whatever order it likes and hands E, a node of the same graph, alongside.
    """

    total: torch.Tensor  # (batch,) U, the potential whose exp(-U) the chains sample
    energy: torch.Tensor  # (batch,) E: U without its Gaussian (base-distribution) terms


Potential = Callable[[list[torch.Tensor]], Union[torch.Tensor, PotentialTerms]]  # a bare tensor: U, taken as all E


class SplitPotential:
    """A potential that exposes its energy term: calling it gives U (a tensor, as any potential), `terms(state)`
    gives `PotentialTerms` (U and E from one forward). `run_langevin` uses `terms` when a potential has it.

    The potential factories of the methods (`core.methods.potentials`, LEBM) return these, so direct callers keep
    getting U while the chains also report E.
    """

    def __init__(self, terms: Callable[[list[torch.Tensor]], PotentialTerms]):
        self.terms = terms

    def __call__(self, state: list[torch.Tensor]) -> torch.Tensor:
        return self.terms(state).total

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
    compile: bool = False  # run each step (potential, gradient, update) as one torch.compile graph (fullgraph)

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
    model_energy: torch.Tensor | None = None  # (num_steps,) mean E (U without its Gaussian terms), finite chains
    model_energy_std: torch.Tensor | None = None  # (num_steps,) spread (population std) of E over finite chains

    @property
    def num_nonfinite(self) -> int:
        """How many chains went non-finite (each counted once however often it happened). Reads the device: call
        it at report time, not in a hot loop (`nonfinite_count` stays on the device)."""
        return 0 if self.nonfinite is None else int(self.nonfinite.sum())

    def metrics(self, prefix: str = "langevin/") -> dict[str, torch.Tensor]:
        """A training step's chain scalars, all device tensors (no host synchronisation): non-finite chains, the
        last step's mean ‖∇U‖, mean U (energy term plus Gaussian terms) at the first and last step (energy_start /
        energy_end), and the mean energy term E alone at the first and last step (energy_first / energy_last)."""
        return {f"{prefix}nonfinite": self.nonfinite_count,
                f"{prefix}grad_norm": self.grad_norm[-1].detach().float(),
                f"{prefix}energy_start": self.energy[0].detach().float(),
                f"{prefix}energy_end": self.energy[-1].detach().float(),
                f"{prefix}energy_first": self.model_energy[0].detach().float(),
                f"{prefix}energy_last": self.model_energy[-1].detach().float()}

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """`num_nonfinite` as a float device tensor (no host synchronisation), for per-step metrics."""
        if self.nonfinite is None:
            return torch.zeros((), device=self.state[0].device)
        return self.nonfinite.sum().float()


class ChainEnergyTrace:
    """The per-step curve of the chains' energy term E, averaged over the chains run since it was last read.

    `add(result)` sums `result.model_energy` and `model_energy_std` on the device (no host synchronisation, so it
    can run every training step); `take()` returns the averages (mean E per step, and the average over runs of the
    per-step spread of E over the chains) on the CPU and starts a new interval. A run of another length starts the
    interval again (the curves would not line up). Not checkpointed: after a resume the curve covers the steps
    since the resume.
    """

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # (2, num_steps): summed mean E and summed std E
        self.runs = 0  # runs summed into `sums`

    def add(self, result: LangevinResult) -> None:
        if result.model_energy is None or result.model_energy.numel() == 0:
            return
        cur = torch.stack([result.model_energy, result.model_energy_std]).detach().float()
        if self.sums is None or self.sums.shape != cur.shape or self.sums.device != cur.device:
            self.sums, self.runs = torch.zeros_like(cur), 0
        self.sums += cur
        self.runs += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean E, std E) per step over the interval, on the CPU, or None when no run was added; resets."""
        if self.sums is None or self.runs == 0:
            return None
        avg = (self.sums / self.runs).cpu()
        self.sums, self.runs = None, 0
        return avg[0], avg[1]


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
    Inside a compiled step it does nothing: flipping parameter flags is not traceable, and the compiled step
    differentiates with respect to the state only (and runs under no_grad, so no parameter graph is kept).
    """
    if torch.compiler.is_compiling():
        yield
        return
    params = [p for m in modules if isinstance(m, torch.nn.Module) for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _terms_and_grad(potential: Potential, state: Sequence[torch.Tensor], autocast: str | None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-sample U and E (fp32, detached) and ∇U (fp32): one forward and one backward."""
    leaves = [s.detach().requires_grad_(True) for s in state]
    with torch.enable_grad():
        with autocast_context(leaves[0].device.type, autocast):
            out = potential.terms(leaves) if isinstance(potential, SplitPotential) else potential(leaves)
        u, e = (out.total, out.energy) if isinstance(out, PotentialTerms) else (out, out)
        u = u.float()  # the reduction and the energy statistics run in fp32 whatever the networks used
        if u.shape != (leaves[0].shape[0],) or e.shape != u.shape:
            raise ValueError(f"potential must return per-sample energies of shape ({leaves[0].shape[0]},), "
                             f"got {tuple(u.shape)} (energy term {tuple(e.shape)})")
        # materialize_grads: a state tensor U ignores gets a zero drift (pure diffusion) instead of an error.
        grads = torch.autograd.grad(u.sum(), leaves, allow_unused=True, materialize_grads=True)
    # fp32 leaves give fp32 grads; the cast documents the contract
    return u.detach(), e.detach().float(), [g.float() for g in grads]


def energy_and_grad(potential: Potential, state: Sequence[torch.Tensor],
                    autocast: str | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample U(state) (fp32, detached) and ∇U (fp32), one forward and one backward.

    The drift is ∂(Σ_b U_b)/∂state: U_b depends on sample b only, so row b of the gradient is ∇U_b whatever the
    batch size (no 1/B from a mean, unlike the official code which multiplies the mean's gradient back by B).
    """
    u, _, grads = _terms_and_grad(potential, state, autocast)
    return u, grads


def langevin_update(state: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], noise: Sequence[torch.Tensor],
                    step_size: float, noise_scale: float = 1.0) -> list[torch.Tensor]:
    """s ← s − (η/2)∇U(s) + noise_scale·√η·ω (vaebm.md Eq. 2 applied to the target of Eq. 9), all in fp32."""
    amp = noise_scale * step_size**0.5
    return [s - 0.5 * step_size * g + amp * w for s, g, w in zip(state, grads, noise)]


def _per_sample(ts: Sequence[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([fn(t.reshape(t.shape[0], -1)) for t in ts], dim=0)


def _advance(state: list[torch.Tensor], init: list[torch.Tensor], u: torch.Tensor, e: torch.Tensor,
             grads: list[torch.Tensor], noise: list[torch.Tensor], step_size: float, noise_scale: float,
             reset_nonfinite: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The update and its statistics on fixed shapes: (new state, finite (batch,) bool, stats (4,)).

    stats = [mean U, mean ‖∇U‖, mean E, std E], each over the chains that stayed finite at this step.
    """
    new_state = langevin_update(state, grads, noise, step_size, noise_scale)
    # A chain is bad at this step if its energy, its gradient or its new state is non-finite.
    finite = torch.isfinite(u) & _per_sample(grads, lambda t: torch.isfinite(t).all(1)).all(0)
    finite &= _per_sample(new_state, lambda t: torch.isfinite(t).all(1)).all(0)
    gnorm = _per_sample(grads, lambda t: t.pow(2).sum(1)).sum(0).sqrt()
    n_ok = finite.sum().clamp(min=1)
    e_mean = torch.where(finite, e, 0.0).sum() / n_ok
    e_std = (torch.where(finite, (e - e_mean).pow(2), 0.0).sum() / n_ok).sqrt()
    stats = torch.stack([torch.where(finite, u, 0.0).sum() / n_ok, torch.where(finite, gnorm, 0.0).sum() / n_ok,
                         e_mean, e_std])
    if reset_nonfinite:
        # Only the failing rows restart; the rest of the batch is untouched (no poisoning through the mean).
        keep = ~finite
        new_state = [torch.where(keep.view(-1, *[1] * (s.dim() - 1)), i, s) for s, i in zip(new_state, init)]
    return new_state, finite, stats


def _fused_step(potential: Potential, state: list[torch.Tensor], init: list[torch.Tensor],
                noise: list[torch.Tensor], step_size: float, noise_scale: float, autocast: str | None,
                reset_nonfinite: bool) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One whole step (potential, gradient, update) as one function: what `LangevinConfig.compile` compiles."""
    u, e, grads = _terms_and_grad(potential, state, autocast)
    return _advance(state, init, u, e, grads, noise, step_size, noise_scale, reset_nonfinite)


_COMPILED_STEP: Callable | None = None


def compiled_step() -> Callable:
    """`_fused_step` under torch.compile (fullgraph: a graph break is an error, not a silent slowdown). One compiled
    object for the process: dynamo caches a graph per potential code, closure contents and shapes, so potentials
    rebuilt every training step from the same factory and networks reuse it."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(_fused_step, fullgraph=True, dynamic=False)
    return _COMPILED_STEP


def compile_context() -> contextlib.AbstractContextManager:
    """Dynamo settings the compiled step needs: trace `torch.autograd.grad` into the graph (the drift)."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)
    return contextlib.nullcontext()


def run_langevin(potential: Potential, init_state: Sequence[torch.Tensor], config: LangevinConfig,
                 generator: torch.Generator | None = None) -> LangevinResult:
    """Run `config.num_steps` Langevin updates of every chain in `init_state` (a list of batch-first tensors).

    `generator` draws the noise ω (on the state's device); give each rank its own (`core.sampling.rank_generator`)
    so ranks draw different chains deterministically. The potential must return one energy per sample and must not
    mix samples (networks in eval mode), otherwise drift and non-finite isolation stop being per-sample. A
    `SplitPotential` (or a potential returning `PotentialTerms`) has its energy term E tracked apart from U
    (`model_energy`); for any other potential E is U.

    No host synchronisation happens inside the loop. Eager steps draw ω after evaluating U (the historical order);
    compiled steps draw it before, which differs only if the potential itself consumes the same random stream (a
    potential drawing from the global RNG while `generator` is None).
    """
    if not init_state:
        raise ValueError("run_langevin: empty state")
    init = [s.detach().float().clone() for s in init_state]  # fp32 always (DESIGN.md "Langevin state in fp32")
    batch, device = init[0].shape[0], init[0].device
    if any(s.shape[0] != batch for s in init):
        raise ValueError("run_langevin: every state tensor must have the same batch size")
    state = [s.clone() for s in init]
    stats: list[torch.Tensor] = []
    bad = torch.zeros(batch, dtype=torch.bool, device=device)
    snapshots: list[list[torch.Tensor]] = []
    snapshot_steps: list[int] = []
    step_args = (config.step_size, config.noise_scale)

    def draw() -> list[torch.Tensor]:
        return [torch.randn(s.shape, generator=generator, device=device, dtype=torch.float32) for s in state]

    def record(step: int) -> None:
        snapshots.append([s.detach().clone() for s in state])
        snapshot_steps.append(step)

    if config.record_every:
        record(0)
    for step in range(config.num_steps):
        if config.compile:
            noise = draw()
            with compile_context(), torch.no_grad():
                state, finite, st = compiled_step()(potential, state, init, noise, *step_args, config.autocast,
                                                    config.reset_nonfinite)
        else:
            u, e, grads = _terms_and_grad(potential, state, config.autocast)
            state, finite, st = _advance(state, init, u, e, grads, draw(), *step_args, config.reset_nonfinite)
        stats.append(st)
        bad |= ~finite
        if config.record_every and ((step + 1) % config.record_every == 0 or step + 1 == config.num_steps):
            record(step + 1)
    table = torch.stack(stats) if stats else torch.zeros(0, 4, device=device)  # (num_steps, 4)
    return LangevinResult(state=[s.detach() for s in state], energy=table[:, 0], grad_norm=table[:, 1],
                          snapshots=snapshots, snapshot_steps=snapshot_steps, nonfinite=bad,
                          model_energy=table[:, 2], model_energy_std=table[:, 3])
