"""DALI backend: the same planned batches as the torch backend, decoded and scaled by a DALI pipeline
(`device="mixed"` nvJPEG decoding on a GPU, a CPU-only pipeline otherwise).

Why `fn.external_source` and not `fn.readers.webdataset`: the reader shards by contiguous sample ranges and
shuffles through a bounded buffer, so it cannot follow a (seed, epoch) permutation or start at an arbitrary image
cursor, and exact-once resume (sharding.py) would be lost. Feeding the encoded bytes from the shared plan keeps the
semantics identical across backends while DALI still does the expensive part (decoding, resizing, flipping,
scaling). The bytes come from the same index files `fn.readers.webdataset` uses; `launchers/bench_data.py` also
times that reader for comparison.

Bad samples: a cheap structural check (PNG CRCs, JPEG end marker, and `dataset.max_image_pixels` from the header)
runs on the host before bytes enter the pipeline, so corrupt or oversize samples are replaced and counted exactly
as in the torch backend. Anything that still fails inside DALI is reported as a DataCorruptionError naming the
shards of that batch.
"""
from __future__ import annotations

from collections import deque
from functools import partial
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from .config import DatasetConfig, LoaderConfig
from .errors import DataCorruptionError
from .loader_base import BaseLoader
from .shard_reader import BadSample, ShardReader, check_encoded_image
from .sharding import BatchPlan


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_dali_device(setting: str) -> str:
    """auto -> gpu when CUDA is usable, else cpu."""
    if setting == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return setting


class _BatchFeed:
    """external_source callback: next plan -> encoded bytes + per-sample metadata. Also records, in order, the
    bad samples each batch met, because DALI returns batches in the order they were fed."""

    def __init__(self, reader: ShardReader, plans: Iterable[BatchPlan], max_pixels: int | None):
        self.reader = reader
        self.plans = iter(plans)
        self.check = partial(check_encoded_image, max_pixels=max_pixels)
        self.pending: deque[tuple[list[BadSample], list[str]]] = deque()

    def __call__(self):
        plan = next(self.plans)  # StopIteration ends the pipeline's epoch
        encoded, labels, used, bad = [], [], [], []
        for index in plan.indices.tolist():
            data, label, actual, met = self.reader.fetch(index, self.check)
            encoded.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(label)
            used.append(actual)
            bad.extend(met)
        self.pending.append((bad, sorted({self.reader.shard_name(i) for i in used})))
        return (encoded, plan.flips.astype(np.int32), np.asarray(labels, np.int64), np.asarray(used, np.int64),
                plan.is_pad.astype(np.uint8))


class DaliImageLoader(BaseLoader):
    """Images through a DALI pipeline; output tensors are identical to TorchImageLoader's (decoder permitting:
    nvJPEG on GPU may differ from libjpeg-turbo by a level on JPEG data; PNG is exact everywhere)."""

    def __init__(self, reader: ShardReader, dataset: DatasetConfig, loader: LoaderConfig, rank: int,
                 world_size: int, seed: int, cur_nimg: int):
        super().__init__(reader, reader.num_samples, dataset, loader, rank, world_size, seed, cur_nimg)
        self.device = resolve_dali_device(loader.dali_device)
        if self.device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("loader.dali_device=gpu but CUDA is not available")
        self.device_id = None
        if self.device == "gpu":
            self.device_id = loader.dali_device_id if loader.dali_device_id is not None else torch.cuda.current_device()

    def _pipeline(self, feed: _BatchFeed):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali import math as dmath

        ds = self.dataset_cfg
        gpu = self.device == "gpu"

        @pipeline_def(batch_size=self.loader_cfg.batch_size, num_threads=self.loader_cfg.dali_threads,
                      device_id=self.device_id, prefetch_queue_depth=self.loader_cfg.dali_prefetch,
                      exec_dynamic=True)
        def pipe():
            encoded, flips, labels, indices, is_pad = fn.external_source(
                source=feed, num_outputs=5, batch=True, dtype=[types.UINT8, types.INT32, types.INT64, types.INT64,
                                                               types.UINT8])
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                       output_type=types.RGB if ds.channels == 3 else types.GRAY)
            if ds.resolution is not None:
                images = fn.resize(images, resize_x=ds.resolution, resize_y=ds.resolution, antialias=True,
                                   interp_type=types.INTERP_LINEAR)
            images = fn.flip(images, horizontal=flips)
            x = fn.cast(fn.transpose(images, perm=[2, 0, 1]), dtype=types.FLOAT)
            # transforms.to_model_range, op for op, so both backends give the same float32 values.
            if ds.num_bits == 8:
                x = x / 255.0
            else:
                x = dmath.floor(x / float(2 ** (8 - ds.num_bits))) / float(2**ds.num_bits - 1)
            if ds.centered:
                x = x * 2.0 - 1.0
            return x, labels, indices, is_pad

        return pipe()

    def _to_torch(self, out) -> torch.Tensor:
        from nvidia.dali.tensors import TensorListGPU

        tensor = out.as_tensor()
        if isinstance(out, TensorListGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

            dst = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype],
                              device=torch.device("cuda", self.device_id))
            return feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream(dst.device))
        return torch.from_numpy(np.array(tensor))  # copy: DALI reuses its output buffers

    def _run(self, plans: Iterable[BatchPlan]) -> Iterator[dict[str, Any]]:
        feed = _BatchFeed(self.reader, plans, self.dataset_cfg.max_image_pixels)
        pipe = self._pipeline(feed)
        pipe.build()
        try:
            while True:
                try:
                    x, labels, indices, is_pad = pipe.run()
                except StopIteration:
                    return
                except DataCorruptionError:
                    raise
                except Exception as e:
                    shards = feed.pending[0][1] if feed.pending else []
                    raise DataCorruptionError(
                        f"DALI failed on a batch from {[str(self.reader.directory / s) for s in shards]}: {e}; "
                        f"run `python launchers/prepare_data.py verify={self.reader.directory}`") from e
                bad, _ = feed.pending.popleft()
                batch = {"x": self._to_torch(x), "label": self._to_torch(labels), "index": self._to_torch(indices),
                         "is_pad": self._to_torch(is_pad).bool()}
                self._account(len(batch["index"]), bad)
                yield batch
        finally:
            del pipe
