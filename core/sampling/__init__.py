"""Sampling: one Langevin implementation on any potential, the cross-rank replay buffer, and importance-resampled
chain initialization (low-dimensional data). The methods build the potentials (core/methods/potentials.py)."""
from core.sampling.langevin import (LangevinConfig, LangevinResult, Potential, autocast_context, energy_and_grad,
                                    frozen, langevin_update, run_langevin)
from core.sampling.resampled_init import ResampledInit, importance_resampled_init
from core.sampling.replay_buffer import ReplayBuffer, ReplayBufferConfig, replay_probability
from core.sampling.rng import rank_generator

__all__ = [
    "LangevinConfig", "LangevinResult", "Potential", "autocast_context", "energy_and_grad", "frozen",
    "langevin_update", "run_langevin", "ReplayBuffer", "ReplayBufferConfig", "replay_probability",
    "rank_generator", "ResampledInit", "importance_resampled_init",
]
