"""PyTorch backend: DataLoader workers decode whole planned batches (Pillow: libjpeg-turbo / zlib);
the main process scales them. Point sets are held in memory and indexed directly.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .config import DatasetConfig, LoaderConfig
from .image_prep import DEFAULT_MAX_IMAGE_PIXELS, GRAY_16_MODES, open_image, reduce_16_to_8
from .loader_base import BaseLoader
from .shard_reader import ShardReader
from .sharding import BatchPlan
from .transforms import dynamic_binarize, to_model_range


def decode_to_uint8(data: bytes, channels: int, resolution: int | None,
                    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded PNG/JPEG -> uint8 (C, H, W) with Pillow; grayscale is replicated for C=3, RGB reduced to ITU-R 601
    luma for C=1; optional antialiased bilinear resize.

    An image whose header declares more than `max_pixels` pixels (0 or None: no limit) raises ImageTooLargeError
    before it is decoded; the reader skips and counts it like an undecodable sample. 16-bit grayscale (not written
    by prepare_data, but possible in shards from elsewhere) is reduced as the shard builder does.

    Pillow rather than torchvision.io: libpng errors inside torchvision's decoder kill the worker process
    (segfault) on corrupt data, where Pillow raises an exception the reader can skip and count.
    """
    image = open_image(data, max_pixels)
    if image.mode in GRAY_16_MODES or image.mode == "I":
        image = Image.fromarray(reduce_16_to_8(np.asarray(image)), "L")
    image = image.convert("RGB" if channels == 3 else "L")
    if resolution is not None and image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class _PlannedBatches(Dataset):
    """Map-style dataset whose "index" is a whole BatchPlan: one worker reads one batch, in plan order."""

    def __init__(self, reader: ShardReader, channels: int, resolution: int | None, max_pixels: int | None):
        self.reader, self.channels, self.resolution, self.max_pixels = reader, channels, resolution, max_pixels

    def _decode(self, data: bytes) -> torch.Tensor:
        return decode_to_uint8(data, self.channels, self.resolution, self.max_pixels)

    def __getitem__(self, plan: BatchPlan) -> dict[str, Any]:
        images, labels, used, bad = [], [], [], []
        for index, flip in zip(plan.indices.tolist(), plan.flips.tolist()):
            image, label, actual, met = self.reader.fetch(index, self._decode)
            images.append(image.flip(-1) if flip else image)
            labels.append(label)
            used.append(actual)
            bad.extend(met)
        return {"x_u8": torch.stack(images), "label": torch.tensor(labels, dtype=torch.int64),
                "index": torch.tensor(used, dtype=torch.int64), "is_pad": torch.from_numpy(plan.is_pad.copy()),
                "position": torch.from_numpy(plan.positions.copy()), "bad": bad}


class _PlanSampler:
    """Hands the DataLoader one BatchPlan per step; it distributes them over workers and keeps their order."""

    def __init__(self, plans: Iterable[BatchPlan]):
        self.plans = plans

    def __iter__(self) -> Iterator[BatchPlan]:
        return iter(self.plans)


def _unbatched(x: Any) -> Any:
    return x


class TorchImageLoader(BaseLoader):
    """Images through a torch DataLoader (`num_workers` processes; 0 reads in the calling process)."""

    def __init__(self, reader: ShardReader, dataset: DatasetConfig, loader: LoaderConfig, rank: int,
                 world_size: int, seed: int, cur_nimg: int):
        super().__init__(reader, reader.num_samples, dataset, loader, rank, world_size, seed, cur_nimg)
        self.device = torch.device(loader.device)
        self._dataset = _PlannedBatches(reader, dataset.channels, dataset.resolution, dataset.max_image_pixels)

    def _run(self, plans: Iterable[BatchPlan]) -> Iterator[dict[str, Any]]:
        cfg = self.loader_cfg
        workers = cfg.num_workers
        loader = DataLoader(self._dataset, batch_size=None, sampler=_PlanSampler(plans), num_workers=workers,
                            collate_fn=_unbatched, pin_memory=cfg.pin_memory and self.device.type == "cuda",
                            prefetch_factor=cfg.prefetch_factor if workers > 0 else None)
        for raw in loader:
            self._account(len(raw["index"]), raw.pop("bad"))
            x = raw.pop("x_u8").to(self.device, non_blocking=True)
            raw["x"] = to_model_range(x, self.dataset_cfg.num_bits, self.dataset_cfg.centered)
            position = raw.pop("position")
            if self.dataset_cfg.binarize:
                raw["x"] = dynamic_binarize(raw["x"], self.slice.plan.seed, position.to(raw["x"].device),
                                            self.dataset_cfg.centered)
            yield raw


class PointLoader(BaseLoader):
    """Point sets (toy 2-D densities): all points in memory, batches gathered by the shared plan."""

    def __init__(self, reader: ShardReader, dataset: DatasetConfig, loader: LoaderConfig, rank: int,
                 world_size: int, seed: int, cur_nimg: int):
        points, labels = reader.read_points()
        dataset_no_flip = DatasetConfig(**{**dataset.__dict__, "flip": False})  # flips mean nothing for points
        super().__init__(reader, len(points), dataset_no_flip, loader, rank, world_size, seed, cur_nimg)
        self.device = torch.device(loader.device)
        self.points = torch.from_numpy(points).to(self.device)
        self.labels = torch.from_numpy(labels if labels is not None else np.full(len(points), -1, np.int64))
        self.labels = self.labels.to(self.device)

    def _run(self, plans: Iterable[BatchPlan]) -> Iterator[dict[str, Any]]:
        for plan in plans:
            idx = torch.from_numpy(plan.indices).to(self.device)
            self._account(len(idx), [])
            yield {"x": self.points[idx], "label": self.labels[idx], "index": idx,
                   "is_pad": torch.from_numpy(plan.is_pad.copy())}
