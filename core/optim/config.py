"""Optimizer settings every method's config carries (`optim.*`); the job derives the learning-rate schedule."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    lr: float = 1e-2  # peak learning rate (Adamax, as NVAE)
    lr_min: float = 1e-4  # cosine schedule floor (equal to lr: constant rate)
    warmup_nimg: int = 0  # linear learning-rate warm-up length in images
    weight_decay: float = 3e-4  # weight decay
    eps: float = 1e-3  # optimizer epsilon (NVAE's 1e-3 keeps early Adamax steps tame)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # (beta1, beta2)

    def validate(self) -> None:
        if not (self.lr > 0 and 0 <= self.lr_min <= self.lr):
            raise ValueError("need 0 <= optim.lr_min <= optim.lr and optim.lr > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("optim.betas needs two values in [0, 1)")
        if self.warmup_nimg < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("optim.warmup_nimg and optim.weight_decay must be >= 0, optim.eps > 0")
