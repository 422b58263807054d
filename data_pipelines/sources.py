"""Inputs the shard builder can read: a folder of images, a zip of images, an .npy/.npz array, an LMDB of images
(the layout NVAE's `create_*_lmdb.py` scripts write), SVHN's official .mat files, and point sets.

A source is a sized sequence of `SourceItem`s in a deterministic order (sorted names, ascending keys) so the same
input always gives the same shards. Decoding is deferred to `SourceItem.load()` so one unreadable file is skipped
and reported by the writer instead of ending the build.

Every reader takes `max_pixels` (PrepareConfig.max_image_pixels): `load()` of an image over it raises
ImageTooLargeError having read only the image's header (or, for arrays, their shape), so such an input is skipped
and counted like an undecodable one without its pixels ever being allocated. Images keep their source bit depth
in `image.info` (see image_prep.to_stored_8bit), which the writer records in the manifest.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .image_prep import DEFAULT_MAX_IMAGE_PIXELS, array_to_image, check_pixel_limit, decode_source_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
ARRAY_IMAGE_KEYS = ("images", "x", "data", "arr_0")
ARRAY_LABEL_KEYS = ("labels", "y", "targets")


@dataclass
class SourceItem:
    """One input image, not yet decoded."""

    origin: str  # file path, zip member or LMDB key: what a skip report names
    label: int | None  # class index, or None for unlabelled sources
    load: Callable[[], Image.Image]  # decodes the image (may raise on corrupt or oversize input)


@dataclass
class ImageSource:
    """A deterministic, sized list of images plus a description for the manifest."""

    items: Sequence[SourceItem]  # in output order
    description: dict  # recorded as manifest["source"]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[SourceItem]:
        return iter(self.items)


@dataclass
class PointSource:
    """A point set (e.g. toy 2-D densities), stored as float32 chunks rather than images."""

    points: np.ndarray  # (N, D) float32
    labels: np.ndarray | None  # (N,) int32 mixture component / class, or None
    description: dict  # recorded as manifest["source"]


def _decode_bytes(data: bytes, max_pixels: int | None) -> Image.Image:
    # header check first, then the full decode here so truncated files fail inside the writer's try block
    return decode_source_image(data, max_pixels)


def _class_of(relative: Path) -> str | None:
    return relative.parts[0] if len(relative.parts) > 1 else None


def _labels_from_dirs(names: list[str | None], labels: str) -> list[int | None]:
    """labels='subdir': first-level directory names, sorted, become classes 0..K-1; 'none': unlabelled."""
    if labels == "none":
        return [None] * len(names)
    if labels != "subdir":
        raise ValueError(f"labels must be 'subdir' or 'none', got {labels!r}")
    if any(n is None for n in names):
        raise ValueError("labels=subdir needs every image inside a class subdirectory")
    classes = {c: i for i, c in enumerate(sorted(set(names)))}
    return [classes[n] for n in names]


def folder_source(root: str | Path, labels: str = "none",
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """All images under `root`, recursively, in sorted path order (CelebA-HQ as users unpack it)."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    rel = [p.relative_to(root) for p in files]
    ys = _labels_from_dirs([_class_of(r) for r in rel], labels)
    items = [SourceItem(str(p), y, (lambda p=p: _decode_bytes(p.read_bytes(), max_pixels))) for p, y in zip(files, ys)]
    return ImageSource(items, {"kind": "folder", "path": str(root.resolve()), "labels": labels})


def zip_source(path: str | Path, labels: str = "none",
               max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """Images inside a zip archive, in sorted member order; members are read lazily from one open handle."""
    path = Path(path)
    archive = zipfile.ZipFile(path)
    names = sorted(n for n in archive.namelist() if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    ys = _labels_from_dirs([_class_of(Path(n)) for n in names], labels)
    items = [SourceItem(f"{path}:{n}", y, (lambda n=n: _decode_bytes(archive.read(n), max_pixels)))
             for n, y in zip(names, ys)]
    return ImageSource(items, {"kind": "zip", "path": str(path.resolve()), "labels": labels})


def _pick(arrays, keys: tuple[str, ...], path: Path, what: str, required: bool):
    for k in keys:
        if k in arrays:
            return arrays[k]
    if required:
        raise ValueError(f"{path}: no {what} array; expected one of the keys {list(keys)}, found {list(arrays)}")
    return None


def array_source(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource | PointSource:
    """An .npy of images (N,H,W[,C]) or points (N,D), or an .npz holding one plus optional labels.

    Images may be uint8, uint16 (reduced by bit depth: round(v * 255 / 65535)), bool, or float in [0,1]; a 2-D
    array is a point set (toy densities from a file).
    """
    path = Path(path)
    if path.suffix == ".npz":
        arrays = np.load(path)
        data = _pick(arrays, ARRAY_IMAGE_KEYS + ("points",), path, "image/point", True)
        labels = _pick(arrays, ARRAY_LABEL_KEYS, path, "label", False)
    else:
        data, labels = np.load(path, mmap_mode="r"), None
    description = {"kind": "array", "path": str(path.resolve())}
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} samples but {len(labels)} labels")
    if data.ndim == 2:
        return PointSource(np.asarray(data, np.float32), None if labels is None else np.asarray(labels, np.int32),
                           description)
    if data.ndim not in (3, 4):
        raise ValueError(f"{path}: expected images (N,H,W[,C]) or points (N,D), got shape {data.shape}")
    if data.ndim == 4 and data.shape[1] in (1, 3) and data.shape[-1] not in (1, 3, 4):
        data = np.moveaxis(data, 1, -1)  # NCHW arrays (torch convention) -> NHWC

    def load(i: int) -> Image.Image:
        check_pixel_limit((data.shape[2], data.shape[1]), max_pixels)  # from the shape, before reading the pixels
        return array_to_image(data[i])

    items = [SourceItem(f"{path}[{i}]", None if labels is None else int(labels[i]), (lambda i=i: load(i)))
             for i in range(len(data))]
    return ImageSource(items, description)


def svhn_mat_source(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """SVHN's official `train_32x32.mat` / `test_32x32.mat` / `extra_32x32.mat` (MATLAB v5): X (32, 32, 3, N) uint8
    and y (N, 1) with labels 1..10, where 10 is the digit 0 (stored as label 0 here). Read with scipy.io.loadmat."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise ImportError("reading an SVHN .mat source needs scipy (pip install scipy)") from e
    path = Path(path)
    arrays = loadmat(str(path))
    if "X" not in arrays or arrays["X"].ndim != 4 or arrays["X"].shape[2] not in (1, 3):
        raise ValueError(f"{path}: expected SVHN's X array of shape (H, W, C, N), found {sorted(arrays)}")
    data = arrays["X"]
    labels = np.asarray(arrays["y"]).reshape(-1) % 10 if "y" in arrays else None
    if labels is not None and len(labels) != data.shape[3]:
        raise ValueError(f"{path}: {data.shape[3]} images but {len(labels)} labels")

    def load(i: int) -> Image.Image:
        check_pixel_limit((data.shape[1], data.shape[0]), max_pixels)
        return array_to_image(np.ascontiguousarray(data[..., i]))

    items = [SourceItem(f"{path}[{i}]", None if labels is None else int(labels[i]), (lambda i=i: load(i)))
             for i in range(data.shape[3])]
    return ImageSource(items, {"kind": "svhn_mat", "path": str(path.resolve())})


def lmdb_source(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """An LMDB as NVAE's `create_*_lmdb.py` write it: keys b"0".."N-1"; values are encoded images (PNG/JPEG) or
    raw square RGB uint8 buffers (NVAE's `is_encoded=False` layout: side = sqrt(len/3))."""
    try:
        import lmdb
    except ImportError as e:
        raise ImportError("reading an LMDB source needs the 'lmdb' package (pip install lmdb)") from e
    path = Path(path)
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=path.is_dir())
    with env.begin() as txn:
        count = txn.stat()["entries"]

    def load(i: int) -> Image.Image:
        with env.begin(buffers=False) as txn:
            data = txn.get(str(i).encode())
        if data is None:
            raise KeyError(f"key {i} missing")
        if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"\xff\xd8":
            return _decode_bytes(data, max_pixels)
        side = int(round(np.sqrt(len(data) / 3)))
        if side * side * 3 != len(data):
            raise ValueError(f"{len(data)} bytes is neither an encoded image nor a square RGB buffer")
        check_pixel_limit((side, side), max_pixels)
        return Image.fromarray(np.frombuffer(data, np.uint8).reshape(side, side, 3), "RGB")

    items = [SourceItem(f"{path}[{i}]", None, (lambda i=i: load(i))) for i in range(count)]
    return ImageSource(items, {"kind": "lmdb", "path": str(path.resolve())})


def is_lmdb(path: Path) -> bool:
    return (path.is_dir() and (path / "data.mdb").is_file()) or path.suffix == ".mdb" or path.suffix == ".lmdb"


def open_path_source(path: str | Path, labels: str = "none",
                     max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource | PointSource:
    """Pick the reader from what `path` is: LMDB dir, image folder, .zip, .npy/.npz, SVHN .mat, MNIST IDX (optionally
    .gz). Images over `max_pixels`
    (0 or None: no limit) raise ImageTooLargeError on `load()`, before their pixels are decoded."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"source not found: {p}")
    if is_lmdb(p):
        return lmdb_source(p, max_pixels)
    if p.is_dir():
        return folder_source(p, labels, max_pixels)
    if p.suffix.lower() == ".zip":
        return zip_source(p, labels, max_pixels)
    if p.suffix.lower() in (".npy", ".npz"):
        return array_source(p, max_pixels)
    from data_pipelines.idx_source import idx_source, is_idx  # idx_source imports this module

    if is_idx(p):
        return idx_source(p, max_pixels)
    if p.suffix.lower() == ".mat":
        return svhn_mat_source(p, max_pixels)
    raise ValueError(f"don't know how to read {p}: expected an image folder, .zip, .npy/.npz, SVHN .mat, MNIST IDX or LMDB")
