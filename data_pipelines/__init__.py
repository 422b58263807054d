"""Data pipelines: WebDataset shards with DALI indexes and a manifest, built-in offline datasets, and torch / DALI
loaders with exact-once distributed coverage and resume (see sharding.py for the policy)."""
from .config import DatasetConfig, LoaderConfig, PrepareConfig
from .errors import DataConfigError, DataCorruptionError, ManifestError
from .loader_factory import build_loader, dist_context, resolve_dataset_dir
from .manifest import load_manifest, manifest_hash, verify_dataset
from .shard_writer import build_dataset
from .transforms import from_model_range, quantize, to_model_range

__all__ = [
    "DatasetConfig", "LoaderConfig", "PrepareConfig", "DataConfigError", "DataCorruptionError", "ManifestError",
    "build_loader", "dist_context", "resolve_dataset_dir", "load_manifest", "manifest_hash", "verify_dataset",
    "build_dataset", "from_model_range", "quantize", "to_model_range",
]
