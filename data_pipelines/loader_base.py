"""What every loader backend shares: position bookkeeping, bad-sample accounting, the batch format.

A batch is a dict:
  x       float32 (B, C, H, W) in [0,1] or [-1,1] (images), or (B, D) (point sets)
  label   int64 (B,), -1 where the dataset has no labels
  index   int64 (B,), dataset index actually delivered (differs from the plan only where a bad sample was replaced)
  is_pad  bool (B,), wrap-around repeats in finite epoch iteration (always False in the endless stream)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .config import DatasetConfig, LoaderConfig
from .shard_reader import BadSample, ShardReader
from .sharding import BatchPlan, RankSlice, SamplePlan

log = logging.getLogger(__name__)


@dataclass
class LoaderStats:
    """Counters the training loop logs as metrics (sum them over ranks for the job total)."""

    batches: int = 0  # batches delivered by this rank
    images: int = 0  # samples delivered by this rank
    bad_samples: int = 0  # bad (undecodable, lost, or over dataset.max_image_pixels) samples met and replaced on
    # this rank; a sample counts once per visit
    bad_indices: set[int] = field(default_factory=set)  # distinct bad samples met on this rank

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return {f"{prefix}bad_samples": float(self.bad_samples), f"{prefix}bad_unique": float(len(self.bad_indices)),
                f"{prefix}images": float(self.images)}


class BaseLoader:
    """Endless stream from `cur_nimg` (`iter(loader)`) or finite epochs (`loader.epoch(e)`), for one rank."""

    def __init__(self, reader: ShardReader | None, num_samples: int, dataset: DatasetConfig, loader: LoaderConfig,
                 rank: int, world_size: int, seed: int, cur_nimg: int):
        self.reader = reader
        self.dataset_cfg = dataset
        self.loader_cfg = loader
        self.rank = rank
        self.world_size = world_size
        self.slice = RankSlice(SamplePlan(num_samples, seed, loader.shuffle, dataset.flip), rank, world_size,
                               loader.batch_size)
        self.cur_nimg = cur_nimg  # global images consumed by all ranks up to the last batch this loader yielded
        self.stats = LoaderStats()

    @property
    def images_per_epoch(self) -> int:
        return self.slice.plan.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.slice.steps_per_epoch(self.loader_cfg.drop_last)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Endless batches continuing from `cur_nimg`; iterating again resumes where the last iterator stopped."""
        for batch in self._run(self.slice.stream_batches(self.cur_nimg)):
            self.cur_nimg += self.slice.global_batch
            yield batch

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """Exactly `batches_per_epoch` batches of epoch `epoch` (does not move `cur_nimg`)."""
        return self._run(self.slice.epoch_batches(epoch, self.loader_cfg.drop_last))

    def state_dict(self) -> dict[str, int]:
        return {"cur_nimg": self.cur_nimg}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cur_nimg = int(state["cur_nimg"])

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        return self.stats.metrics(prefix)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def _run(self, plans: Iterable[BatchPlan]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _account(self, batch_size: int, bad: list[BadSample]) -> None:
        """Count, report (rank 0) and enforce the bad-sample budget for one delivered batch."""
        self.stats.batches += 1
        self.stats.images += batch_size
        if not bad:
            return
        self.stats.bad_samples += len(bad)
        for b in bad:
            if b.index not in self.stats.bad_indices and self.rank == 0:
                log.warning("skipped bad sample %d in %s: %s", b.index, self.reader.directory / b.shard, b.reason)
            self.stats.bad_indices.add(b.index)
        self.reader.check_bad_fraction(self.stats.bad_indices | self.reader.lost)
