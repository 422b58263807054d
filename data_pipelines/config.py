"""Typed configs for building shards and loading them. Hydra/OmegaConf fill these from yaml and `key=value`;
`validate()` turns every impossible combination into one DataConfigError line before any rank starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DataConfigError
from .manifest import VERIFY_MODES
from .image_prep import CROPS, DEFAULT_MAX_IMAGE_PIXELS, RESIZE_FILTERS

BUILTIN_SETS = ("digits", "photos256", "faces25", "toy2d")
TOY2D_FORMULAS = ("25gaussians", "8gaussians", "swissroll")
DEFAULT_CACHE = "~/.cache/vaebm/datasets"


def default_cache_dir(configured: str | None = None) -> Path:
    """Config value, else $VAEBM_DATA_CACHE, else ~/.cache/vaebm/datasets."""
    return Path(configured or os.environ.get("VAEBM_DATA_CACHE") or DEFAULT_CACHE).expanduser()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DataConfigError(message)


@dataclass
class PrepareConfig:
    """What `launchers/prepare_data.py` builds (or verifies)."""

    source: str | None = None  # built-in set (digits|photos256|faces25|toy2d) or a path: image folder, .zip, .npy/.npz, SVHN .mat, MNIST IDX (.gz), LMDB
    out: str | None = None  # output directory for shards, indexes and manifest.json
    name: str | None = None  # shard file prefix; default: the built-in name or the source's file name
    size: int | None = None  # output side length (square); None: built-in default, or keep the source size
    crop: str = "center"  # center: largest centered square | celeba_box: NVAE's CelebA-64 face box | none: as is
    resize_filter: str = "lanczos"  # PIL filter for build-time resizing: lanczos|bicubic|bilinear|box|nearest
    format: str = "png"  # image encoding in the shards: png (lossless) or jpg
    jpeg_quality: int = 95  # JPEG quality when format=jpg
    samples_per_shard: int = 10000  # start a new shard after this many samples...
    max_shard_bytes: int = 1_000_000_000  # ...or after this many bytes, whichever comes first
    num_samples: int | None = None  # photos256: number of crops; toy2d: number of points; paths: keep the first N
    formula: str = "25gaussians"  # toy2d density: 25gaussians | 8gaussians | swissroll
    seed: int = 0  # randomness of built-in sets (photos256 crop positions, toy2d points)
    labels: str = "none"  # folder/zip sources: "subdir" makes first-level directory names the classes
    max_bad_fraction: float = 0.01  # fail the build if more than this fraction of source items cannot be decoded
    # Largest source image accepted, in pixels (width * height), checked from the image header before anything is
    # decoded; a larger image is skipped and counted like an undecodable one (manifest `skipped_inputs`, reason
    # "too_large", within max_bad_fraction). 0 or null: no limit of ours (Pillow's own guard still refuses images
    # over 2 * PIL.Image.MAX_IMAGE_PIXELS). Default 8192 * 8192: see image_prep.DEFAULT_MAX_IMAGE_PIXELS.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    overwrite: bool = False  # replace an existing, different dataset in `out`
    verify: str | None = None  # a shard directory: check every SHA-256 against its manifest, build nothing

    def validate(self) -> None:
        if self.verify is not None:
            _require(self.source is None, "give either verify=<dir> or source=..., not both")
            return
        _require(self.source is not None, "source is required (a built-in set or a path); e.g. source=digits")
        _require(self.out is not None, "out is required: the directory to write shards into")
        if self.source not in BUILTIN_SETS:
            _require(Path(self.source).exists(), f"source {self.source!r} is neither a built-in set "
                     f"({', '.join(BUILTIN_SETS)}) nor an existing path")
        _require(self.size is None or self.size > 0, f"size must be positive, got {self.size}")
        _require(self.crop in CROPS, f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        _require(self.resize_filter in RESIZE_FILTERS,
                 f"resize_filter must be one of {sorted(RESIZE_FILTERS)}, got {self.resize_filter!r}")
        _require(self.format in ("png", "jpg"), f"format must be png or jpg, got {self.format!r}")
        _require(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        _require(self.samples_per_shard > 0, "samples_per_shard must be positive")
        _require(self.max_shard_bytes > 0, "max_shard_bytes must be positive")
        _require(self.num_samples is None or self.num_samples > 0, "num_samples must be positive")
        _require(self.formula in TOY2D_FORMULAS, f"formula must be one of {TOY2D_FORMULAS}, got {self.formula!r}")
        _require(self.labels in ("none", "subdir"), f"labels must be none or subdir, got {self.labels!r}")
        _require(0.0 <= self.max_bad_fraction < 1.0, "max_bad_fraction must be in [0, 1)")
        _require(self.max_image_pixels is None or self.max_image_pixels >= 0,
                 f"max_image_pixels must be >= 0 (0 or null: no limit), got {self.max_image_pixels}")


@dataclass
class DatasetConfig:
    """Which data a run reads and how images are presented to the model (conf/dataset/*.yaml)."""

    name: str = "digits"  # built-in set to build on first use, or a free label when `path` is given
    path: str | None = None  # shard directory written by prepare_data; None: built-in `name` from the cache
    cache_dir: str | None = None  # where built-ins are built; None: $VAEBM_DATA_CACHE or ~/.cache/vaebm/datasets
    size: int | None = None  # built-in build size (None: the set's default: digits 32, faces25 32, photos256 256)
    num_samples: int | None = None  # built-in build: photos256 crops (default 1000) / toy2d points (default 100000)
    formula: str = "25gaussians"  # toy2d density
    build_seed: int = 0  # randomness of built-in builds (not of the training order)
    resolution: int | None = None  # load-time resize to this side (antialiased bilinear); None: stored size
    channels: int = 3  # 3: RGB (grayscale data replicated); 1: luminance
    num_bits: int = 8  # quantize to this many bits per channel (NVAE uses 5 for CelebA-HQ-256)
    centered: bool = True  # True: x in [-1,1] (NVAE); False: [0,1]
    flip: bool = False  # random horizontal flips, a function of (seed, epoch, sample)
    # Dynamic binarization (binarized MNIST): each time a sample is delivered its pixels become 0/1 with probability
    # equal to their intensity, a function of (seed, stream position, pixel) (transforms.dynamic_binarize).
    binarize: bool = False
    verify: str = "size"  # on open: off | size (cheap, detects truncation) | sha256 (reads every byte)
    expect_crop: str | None = None  # shards must have been built with this crop (celeba64: celeba_box); None: any
    max_bad_fraction: float = 0.01  # fail when more than this fraction of the dataset is undecodable or truncated
    # Loaders: a stored image whose header declares more pixels than this is not decoded but skipped and counted
    # as a bad sample (data/bad_samples), like an undecodable one. 0 or null: no limit. Default 8192 * 8192.
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS

    def validate(self) -> None:
        if self.path is None:
            _require(self.name in BUILTIN_SETS,
                     f"dataset.name={self.name!r} is not a built-in set ({', '.join(BUILTIN_SETS)}); set dataset.path")
        _require(self.resolution is None or self.resolution > 0, "dataset.resolution must be positive")
        _require(self.channels in (1, 3), f"dataset.channels must be 1 or 3, got {self.channels}")
        _require(1 <= self.num_bits <= 8, f"dataset.num_bits must be in 1..8, got {self.num_bits}")
        _require(self.verify in VERIFY_MODES, f"dataset.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        _require(self.expect_crop is None or self.expect_crop in CROPS,
                 f"dataset.expect_crop must be one of {', '.join(CROPS)} or null, got {self.expect_crop!r}")
        _require(0.0 <= self.max_bad_fraction < 1.0, "dataset.max_bad_fraction must be in [0, 1)")
        _require(self.max_image_pixels is None or self.max_image_pixels >= 0,
                 f"dataset.max_image_pixels must be >= 0 (0 or null: no limit), got {self.max_image_pixels}")
        _require(self.formula in TOY2D_FORMULAS, f"dataset.formula must be one of {TOY2D_FORMULAS}")
        _require(not self.binarize or self.num_bits == 8, "dataset.binarize needs dataset.num_bits=8 (it binarizes "
                 "the 8-bit intensities)")

    def prepare_config(self, out: Path) -> PrepareConfig:
        """How a built-in set is built into the cache."""
        return PrepareConfig(source=self.name, out=str(out), size=self.size, num_samples=self.num_samples,
                             formula=self.formula, seed=self.build_seed)


@dataclass
class LoaderConfig:
    """How batches are produced (the training config's `data.loader` section)."""

    backend: str = "auto"  # auto (dali when importable and a GPU is present, else torch) | torch | dali
    batch_size: int = 64  # per rank; every rank gets the same number of batches
    num_workers: int = 4  # torch backend: DataLoader worker processes (0: read in the main process)
    prefetch_factor: int = 2  # torch backend: batches each worker reads ahead
    pin_memory: bool = True  # torch backend: page-locked host batches when `device` is CUDA
    device: str = "cpu"  # torch backend: where batches land; uint8 moves, scaling runs there (4x less copying)
    shuffle: bool = True  # False: dataset order every epoch (evaluation, reference statistics)
    drop_last: bool = False  # epoch iteration: drop the tail that does not fill world_size*batch_size, else wrap-pad
    dali_device: str = "auto"  # dali backend: auto | cpu | gpu (gpu decodes with device="mixed")
    dali_device_id: int | None = None  # dali backend GPU; None: torch.cuda.current_device()
    dali_threads: int = 2  # dali backend: CPU threads for decoding / host ops
    dali_prefetch: int = 2  # dali backend: prefetch queue depth

    def validate(self) -> None:
        _require(self.backend in ("auto", "torch", "dali"), f"loader.backend must be auto|torch|dali, got {self.backend!r}")
        _require(self.batch_size > 0, "loader.batch_size must be positive")
        _require(self.num_workers >= 0, "loader.num_workers must be >= 0")
        _require(self.prefetch_factor > 0, "loader.prefetch_factor must be positive")
        _require(self.dali_device in ("auto", "cpu", "gpu"), f"loader.dali_device must be auto|cpu|gpu")
        _require(self.dali_threads > 0 and self.dali_prefetch > 0, "loader.dali_threads/dali_prefetch must be positive")
