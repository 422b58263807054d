"""MNIST's IDX files (LeCun's format, optionally gzip-compressed) as an `ImageSource` for the shard builder.

    python launchers/prepare_data.py source=<dir>/train-images-idx3-ubyte.gz out=$VAEBM_DATA/mnist

Nothing is downloaded: the user provides the files. An IDX file is a 4-byte magic number (two zero bytes, a type
code, the number of dimensions), one big-endian uint32 per dimension, then the values in C order. Images are
`idx3` files of unsigned bytes (type 0x08) with dimensions (N, rows, cols); labels are `idx1` files (N,). When the
images file sits next to its labels file (`train-images-idx3-ubyte[.gz]` -> `train-labels-idx1-ubyte[.gz]`, and
`t10k-...` likewise) the labels are attached to the items.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from .image_prep import DEFAULT_MAX_IMAGE_PIXELS, array_to_image, check_pixel_limit
from .sources import ImageSource, SourceItem

_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def is_idx(path: str | Path) -> bool:
    """Whether `path` names an IDX file (by its magic number; .gz files are looked into)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with _open(p) as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in _DTYPES and 1 <= head[3] <= 4


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in an IDX file (native byte order); ValueError on a malformed or truncated file."""
    p = Path(path)
    with _open(p) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{p}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES or not 1 <= ndim <= 4:
        raise ValueError(f"{p}: not an IDX file (type 0x{code:02x}, {ndim} dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{p}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{p}: IDX header declares shape {shape} ({expected} bytes of data) but the file holds "
                         f"{len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def labels_path_for(images: Path) -> Path | None:
    """The labels file beside an images file (`-images-idx3-` -> `-labels-idx1-`, same compression), if present."""
    name = images.name
    if "images-idx3" not in name:
        return None
    candidate = images.with_name(name.replace("images-idx3", "labels-idx1"))
    return candidate if candidate.is_file() else None


def idx_source(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ImageSource:
    """An IDX images file (N, rows, cols) of uint8 as grayscale images, labelled when the labels file is beside it."""
    p = Path(path)
    images = read_idx(p)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{p}: expected an idx3 file of unsigned bytes (N, rows, cols), got {images.dtype} "
                         f"{images.shape}")
    labels = None
    lp = labels_path_for(p)
    if lp is not None:
        labels = read_idx(lp)
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{lp}: {labels.shape} labels for {len(images)} images")

    def load(i: int) -> Image.Image:
        check_pixel_limit((images.shape[2], images.shape[1]), max_pixels)
        return array_to_image(images[i])

    items = [SourceItem(f"{p}[{i}]", None if labels is None else int(labels[i]), (lambda i=i: load(i)))
             for i in range(len(images))]
    description = {"kind": "idx", "path": str(p.resolve()), "labels": None if lp is None else str(lp.resolve())}
    return ImageSource(items, description)


__all__ = ["idx_source", "read_idx", "is_idx", "labels_path_for"]
