"""Per-rank random generators for sampling (DESIGN.md "Per-rank randomness").

Every rank draws its own Langevin noise, fresh chains and replay indices from a generator seeded by
(seed, rank, step, stream): ranks never draw identical negatives, and a resumed run draws exactly the noise an
uninterrupted one would, without saving generator states.
"""
from __future__ import annotations

import torch

from core.seeding import derive_seed

# Keeps these streams disjoint from `core.dist.seed_everything`, which seeds the global RNGs from (seed, rank, step):
# without it, stream 0 would replay the very numbers the global torch RNG draws in the same step.
_SAMPLING_DOMAIN = 0x5A4D50  # "ZMP"


def rank_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu",
                   stream: int = 0) -> torch.Generator:
    """A torch.Generator on `device` seeded from (seed, rank, step, stream) via `core.seeding.derive_seed`.

    stream: separates independent uses within one step (e.g. 0 = chain initialisation, 1 = Langevin noise).
    """
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, rank, step, _SAMPLING_DOMAIN, stream))
    return g
