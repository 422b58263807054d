"""Seed derivation shared by every layer (DESIGN.md "Per-rank randomness"): no process group, no framework state.

Kept apart from `core.dist` so that `core.sampling` and the other lower layers can derive per-rank seeds without
importing the distributed runtime.
"""
from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from (seed, keys...) that differs for every key tuple (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
