"""One entry point for training code: resolve the dataset (building a built-in set on first use), pick the
backend, return a loader. Ranks are passed in explicitly; `dist_context()` is the only place that reads the
process environment for them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from .config import DatasetConfig, LoaderConfig, default_cache_dir
from .dali_loader import DaliImageLoader, dali_available, resolve_dali_device
from .errors import DataConfigError
from .loader_base import BaseLoader
from .manifest import MANIFEST_NAME, load_manifest
from .shard_reader import ShardReader
from .shard_writer import build_dataset
from .torch_loader import PointLoader, TorchImageLoader

log = logging.getLogger(__name__)


def builtin_dir(dataset: DatasetConfig) -> Path:
    """Cache directory of a built-in set: name plus a digest of the build parameters, so variants coexist."""
    params = asdict(dataset.prepare_config(Path(".")))
    params.pop("out")
    # Added after cache names were fixed; built-in images are far below any sensible limit. Leaving it out keeps
    # existing caches valid instead of rebuilding every built-in set under a new name.
    params.pop("max_image_pixels")
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return default_cache_dir(dataset.cache_dir) / f"{dataset.name}-{digest}"


def resolve_dataset_dir(dataset: DatasetConfig, progress: bool = False) -> Path:
    """Shard directory for `dataset`; built-in sets are built on first use under an exclusive file lock, so ranks
    starting together build once and the others wait and read the finished shards."""
    dataset.validate()
    if dataset.path is not None:
        return Path(dataset.path).expanduser()
    out = builtin_dir(dataset)
    if (out / MANIFEST_NAME).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / MANIFEST_NAME).is_file():
            log.info("building built-in dataset %s into %s", dataset.name, out)
            build_dataset(dataset.prepare_config(out), progress=progress)
    return out


def choose_backend(loader: LoaderConfig, kind: str) -> str:
    """auto: DALI when it is installed and a GPU is present (its CPU pipeline is a fallback, not a default); point
    sets always use the in-memory torch path."""
    if kind == "points":
        return "torch"
    if loader.backend == "auto":
        return "dali" if dali_available() and resolve_dali_device(loader.dali_device) == "gpu" else "torch"
    if loader.backend == "dali" and not dali_available():
        raise DataConfigError("loader.backend=dali but nvidia-dali is not installed (pip install '.[dali]')")
    return loader.backend


def build_loader(dataset: DatasetConfig, loader: LoaderConfig, *, rank: int, world_size: int, seed: int,
                 cur_nimg: int = 0) -> BaseLoader:
    """Loader for one rank. `cur_nimg` is the global number of images already consumed (resume point).

    Iterate it for an endless stream, or call `.epoch(e)` for one finite epoch; see sharding.py for the exact
    order, padding and resume policy.
    """
    dataset.validate()
    loader.validate()
    directory = resolve_dataset_dir(dataset, progress=rank == 0)
    reader = ShardReader(directory, verify=dataset.verify, max_bad_fraction=dataset.max_bad_fraction,
                         log_problems=rank == 0)
    kind = reader.manifest.kind
    built_crop = reader.manifest.preprocessing.get("crop")
    if dataset.expect_crop is not None and built_crop != dataset.expect_crop:
        raise DataConfigError(f"{directory} was built with crop={built_crop}, but dataset {dataset.name!r} is defined "
                              f"with crop={dataset.expect_crop}: rebuild it with launchers/prepare_data.py "
                              f"crop={dataset.expect_crop} (or set dataset.expect_crop=null to use it as it is)")
    backend = choose_backend(loader, kind)
    if dataset.binarize and backend == "dali":
        # DALI's pipeline does not see stream positions; binarization is a function of them (transforms.py)
        if loader.backend == "dali":
            raise DataConfigError("dataset.binarize=true needs loader.backend=torch (or auto)")
        backend = "torch"
    args = (reader, dataset, loader, rank, world_size, seed, cur_nimg)
    if kind == "points":
        return PointLoader(*args)
    if backend == "dali":
        return DaliImageLoader(*args)
    return TorchImageLoader(*args)


def dist_context() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialised, else the launcher's RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def dataset_manifest_hash(dataset: DatasetConfig) -> str:
    """manifest_hash of the dataset a config refers to (builds a built-in set if needed)."""
    return load_manifest(resolve_dataset_dir(dataset)).content_hash()
