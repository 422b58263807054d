"""Build-time image geometry and normalisation (PIL/numpy only, so the shard builder does not import torch).

Geometry (center crop, resize to the stored size) happens once, at shard-build time, so that the load-time path is
decode -> optional resize -> flip -> scale and the DALI and torch backends produce bit-identical tensors.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def center_crop_square(image: Image.Image) -> Image.Image:
    """Largest centered square (the CelebA-HQ / LSUN convention before resizing)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def prepare_image(image: Image.Image, size: int | None, crop: str, resize_filter: str) -> Image.Image:
    """Build-time geometry: optional center crop to a square, then resize to `size` x `size` (None keeps the size)."""
    if crop == "center":
        image = center_crop_square(image)
    elif crop != "none":
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTERS[resize_filter])
    return image


def as_uint8_hwc(array: np.ndarray) -> np.ndarray:
    """Normalise a source array to uint8 HxW (gray) or HxWx3 (RGB): floats in [0,1] are scaled, RGBA loses alpha."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, bool or float in [0,1], got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    return np.ascontiguousarray(a)
