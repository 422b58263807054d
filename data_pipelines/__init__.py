"""Data pipelines: WebDataset shards with DALI indexes and a manifest, built-in offline datasets, and torch / DALI
loaders with exact-once distributed coverage and resume (see sharding.py for the policy).

Loader entry points are imported on first use, so the shard builder (and `prepare_data.py`) starts without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import DatasetConfig, LoaderConfig, PrepareConfig
from .errors import DataConfigError, DataCorruptionError, ManifestError
from .manifest import load_manifest, manifest_hash, verify_dataset
from .shard_writer import build_dataset

_LAZY = {
    "build_loader": "loader_factory", "dist_context": "loader_factory", "resolve_dataset_dir": "loader_factory",
    "dataset_manifest_hash": "loader_factory", "quantize": "transforms", "to_model_range": "transforms",
    "from_model_range": "transforms",
}

__all__ = ["DatasetConfig", "LoaderConfig", "PrepareConfig", "DataConfigError", "DataCorruptionError",
           "ManifestError", "load_manifest", "manifest_hash", "verify_dataset", "build_dataset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
