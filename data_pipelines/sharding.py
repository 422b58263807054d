"""Which sample each rank reads at each step: a pure function of (num_samples, seed, epoch, rank, world_size,
batch_size, position), shared by every backend.

Policy
------
* The data is one endless stream of positions 0, 1, 2, ...; position p belongs to epoch e = p // N and reads
  sample `order(e)[p % N]`, where `order(e)` is a permutation of all N samples drawn from (seed, e) (the identity
  when shuffle is off). Each epoch therefore covers every sample exactly once, across all ranks and workers,
  whatever the shard count.
* Global step k (counted from the start position `cur_nimg`) consumes positions
  [cur_nimg + k*R*B, cur_nimg + (k+1)*R*B); rank r takes the r-th block of B of them. Every rank gets the same
  number of batches (infinitely many), so collectives cannot deadlock, and a run resumed at its `cur_nimg`
  (global images seen) continues at exactly the next position: nothing repeated, nothing skipped, even with a
  different world size or batch size after the restart.
* A global batch that straddles an epoch boundary takes the end of one permutation and the start of the next,
  so the stream has no padding and no dropped tail.
* Finite epoch iteration (`epoch_batches`, for evaluation passes) covers positions [e*N, e*N + S*R*B), with
  S = ceil(N / (R*B)) steps, positions past e*N + N wrapping to the start of the same permutation and flagged
  `is_pad` (consumers that must not double count, like reference statistics, drop them);
  with drop_last, S = floor(N / (R*B)) and the tail of the permutation is not visited.
* Sample reading inside a batch is split across DataLoader workers by whole batches, so workers never need to
  coordinate: any number of ranks x workers works with a single shard.
* Flips are a per-(seed, epoch) Bernoulli draw per sample, decided here and not in a worker, so both backends and
  every worker count agree on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    """What one rank reads for one step."""

    step: int  # global step counted from the loader's start position
    positions: np.ndarray  # (B,) int64 stream positions
    indices: np.ndarray  # (B,) int64 dataset sample indices
    flips: np.ndarray  # (B,) bool horizontal flip per sample
    is_pad: np.ndarray  # (B,) bool: wrap-around repeats of the epoch iteration


@dataclass(frozen=True)
class SamplePlan:
    """Global order of the data, and each rank's slice of it."""

    num_samples: int  # N: samples in the dataset
    seed: int  # training seed; the order is a function of (seed, epoch)
    shuffle: bool = True  # False: identity order every epoch
    flip: bool = False  # draw random horizontal flips

    def __post_init__(self) -> None:
        if self.num_samples <= 0:
            raise ValueError("a sample plan needs at least one sample")

    @lru_cache(maxsize=4)
    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch, 0]).permutation(self.num_samples).astype(np.int64)

    @lru_cache(maxsize=4)
    def epoch_flips(self, epoch: int) -> np.ndarray:
        """Flip flags indexed by *sample* (so a sample's flip does not depend on its position or the world size)."""
        if not self.flip:
            return np.zeros(self.num_samples, dtype=bool)
        return np.random.default_rng([self.seed, epoch, 1]).random(self.num_samples) < 0.5

    def lookup(self, positions: np.ndarray, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions -> (sample indices, flips). With `epoch`, positions wrap inside that epoch."""
        n = self.num_samples
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // n if epoch is None else np.full_like(positions, epoch)
        offsets = positions % n
        indices = np.empty_like(positions)
        flips = np.empty(positions.shape, dtype=bool)
        for e in np.unique(epochs):
            sel = epochs == e
            indices[sel] = self.order(int(e))[offsets[sel]]
            flips[sel] = self.epoch_flips(int(e))[indices[sel]]
        return indices, flips


@dataclass(frozen=True)
class RankSlice:
    """One rank's view of a SamplePlan."""

    plan: SamplePlan  # the global order
    rank: int  # this process's rank
    world_size: int  # number of ranks
    batch_size: int  # per-rank batch size

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        if self.batch_size <= 0:
            raise ValueError("batch_size must be positive")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size

    def steps_per_epoch(self, drop_last: bool = False) -> int:
        n, g = self.plan.num_samples, self.global_batch
        return n // g if drop_last else -(-n // g)

    def _positions(self, base: int, step: int) -> np.ndarray:
        start = base + step * self.global_batch + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def stream_batches(self, cur_nimg: int = 0, num_steps: int | None = None) -> Iterator[BatchPlan]:
        """Endless (or `num_steps`) batches starting at global image cursor `cur_nimg`."""
        if cur_nimg < 0:
            raise ValueError("cur_nimg must be >= 0")
        step = 0
        while num_steps is None or step < num_steps:
            positions = self._positions(cur_nimg, step)
            indices, flips = self.plan.lookup(positions)
            yield BatchPlan(step, positions, indices, flips, np.zeros(len(positions), dtype=bool))
            step += 1

    def epoch_batches(self, epoch: int, drop_last: bool = False) -> Iterator[BatchPlan]:
        """One epoch: the same number of batches on every rank (see the module policy for padding/dropping)."""
        n = self.plan.num_samples
        for step in range(self.steps_per_epoch(drop_last)):
            offsets = self._positions(0, step)
            indices, flips = self.plan.lookup(offsets, epoch=epoch)
            yield BatchPlan(step, epoch * n + offsets, indices, flips, offsets >= n)
