"""Optimizers for the trained networks (plain torch optimizers, usable as DeepSpeed client optimizers)."""
from core.optim.clipped_adam import ClippedAdam

__all__ = ["ClippedAdam"]
