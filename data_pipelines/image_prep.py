"""Build-time image geometry and normalisation (PIL/numpy only, so the shard builder does not import torch).

Geometry (center crop, resize to the stored size) happens once, at shard-build time, so that the load-time path is
decode -> optional resize -> flip -> scale and the DALI and torch backends produce bit-identical tensors.

Bit depth: shards store 8 bits per channel. A source with more is reduced according to its bit depth, never
according to its content (the same 16-bit value always becomes the same 8-bit value, whatever else the image
holds): 16-bit samples v become round(v * 255 / 65535) (`reduce_16_to_8`). The bit depth of the inputs and the
conversion used are recorded in the manifest's `source` section.

Pixel limit: `open_image` reads only an encoded image's header and refuses an image larger than `max_pixels`
before any pixel is decoded (a few KB of PNG can declare gigapixels that would be allocated on decoding).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import ImageTooLargeError

RESIZE_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}

# Default of `max_image_pixels` (PrepareConfig and DatasetConfig): 8192 x 8192 = 67,108,864 pixels. That is 64 times
# the largest source images of the presets (CelebA-HQ, 1024 x 1024), admits full-resolution photographs of current
# cameras (up to about 61 MP), bounds one decode to 256 MiB (RGBA, 8 bits) per process, and stays below Pillow's own
# warning threshold (PIL.Image.MAX_IMAGE_PIXELS, about 89.5 MP), so an accepted image never triggers that warning.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192

# Image.info key our decoders set: (bits per channel of the source, conversion to 8 bits or None). Always written
# (or removed) by our code after decoding, so a file's own metadata cannot supply it.
SOURCE_BITS_INFO = "vaebm.source_bits"
ROUND_16_TO_8 = "16-bit: round(v * 255 / 65535)"
HIGH_BYTE_16_TO_8 = "16-bit: v >> 8 (Pillow's decoder keeps the high byte)"
ONE_BIT_TO_8 = "1-bit: v * 255"
FLOAT_UNIT_TO_8 = "float in [0, 1]: clip(round(v * 255), 0, 255)"  # float arrays (.npy/.npz)
FLOAT_PILLOW_TO_8 = "float: clip(round(v), 0, 255)"  # Pillow "F" images: Pillow's own F -> L convention
GRAY_16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Decoder raw modes that carry 16 bits per channel. Listed rather than parsed: "RGB;16" or "BGR;16" without a byte
# order are 5-6-5 packed pixels (16 bits per pixel), not 16 bits per channel.
_RAWMODES_16 = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "L;16", "L;16B", "LA;16B",
                          "RGB;16B", "RGB;16L", "RGB;16N", "RGBA;16B", "RGBA;16L", "RGBA;16N",
                          "RGBX;16B", "RGBX;16L", "RGBX;16N"})
_REDUCE_ROWS = 1024  # rows per block in reduce_16_to_8: bounds the uint32 temporary for very large images


def center_crop_square(image: Image.Image) -> Image.Image:
    """Largest centered square (the CelebA-HQ / LSUN convention before resizing)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


# The face box NVAE (and VAEBM after it) cuts from the 178x218 aligned CelebA images before resizing to 64x64:
# (left, upper, right, lower) = (15, 40, 178 - 15, 218 - 30), a 148x148 square. A different crop is a different
# dataset, and FIDs against the papers' would not compare.
CELEBA_BOX = (15, 40, 163, 188)
CROPS = ("center", "celeba_box", "none")


class CropError(ValueError):
    """An image the configured crop is not defined on (skipped and counted by the shard builder)."""


def celeba_box_crop(image: Image.Image) -> Image.Image:
    """The CelebA-64 face box; refuses images that are not the 178x218 aligned CelebA frames it is defined on."""
    if image.size != (178, 218):
        raise CropError(f"crop=celeba_box is defined on the 178x218 aligned CelebA images, got {image.size[0]}x"
                         f"{image.size[1]}")
    return image.crop(CELEBA_BOX)


def prepare_image(image: Image.Image, size: int | None, crop: str, resize_filter: str) -> Image.Image:
    """Build-time geometry: a crop (`CROPS`: centered square, the CelebA-64 face box, none), then resize to
    `size` x `size` (None keeps the size)."""
    if crop == "center":
        image = center_crop_square(image)
    elif crop == "celeba_box":
        image = celeba_box_crop(image)
    elif crop != "none":
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTERS[resize_filter])
    return image


def check_pixel_limit(size: tuple[int, int], max_pixels: int | None) -> None:
    """Raise ImageTooLargeError when width * height exceeds `max_pixels`; 0 or None means no limit."""
    if max_pixels and size[0] * size[1] > max_pixels:
        raise ImageTooLargeError(f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels is more than "
                                 f"max_image_pixels={max_pixels:,}")


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open encoded image bytes and enforce the pixel limit; only the header has been read when this returns.

    The check is per call: Pillow's process-wide guard (PIL.Image.MAX_IMAGE_PIXELS, not changed here) still applies
    on top of it, warning above about 89.5 MP and refusing twice that; its refusal is reported as
    ImageTooLargeError as well.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(str(e)) from e
    check_pixel_limit(image.size, max_pixels)
    return image


def reduce_16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit samples -> uint8 as round(v * 255 / 65535), computed exactly in integers.

    Rounding, not a right shift: v >> 8 (= floor(v / 256)) is biased, on average half a level too dark, while
    rounding picks the nearest 8-bit level (error within half a level, zero on average). Both map 0 -> 0 and
    65535 -> 255 and undo the usual 8 -> 16-bit expansion v8 * 257 exactly. v * 255 / 65535 = v / 257 is never
    halfway between two integers (2v = 257 * odd has no solution), so no tie rule is involved. Values outside
    0..65535 (Pillow's "I" mode holds 32-bit integers) are clipped first.
    """
    a = np.asarray(values)
    if a.dtype != np.uint16:
        a = np.clip(a, 0, 65535)
    out = np.empty(a.shape, np.uint8)
    for start in range(0, max(len(a), 1), _REDUCE_ROWS):
        block = a[start : start + _REDUCE_ROWS].astype(np.uint32)
        out[start : start + _REDUCE_ROWS] = (block * 255 + 32767) // 65535
    return out


def _decoder_bits(image: Image.Image) -> int | None:
    """Bits per channel the file stores, read from the decoder's raw mode before load(): 16 for "I;16B",
    "RGB;16B" and the like, 32 for "I;32..." raw modes, None when the mode itself tells (8-bit and below)."""
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None
        raw = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args and
                                                   isinstance(args[0], str) else None)
        if raw in _RAWMODES_16:
            return 16
        if raw is not None and raw.startswith("I;32"):
            return 32
    return None


def _rgb16_png_rounded(data: bytes, image: Image.Image) -> Image.Image | None:
    """A 16-bit RGB(A) PNG with both bytes of every sample, reduced with `reduce_16_to_8`.

    Pillow has no 16-bit colour modes and keeps only each sample's high byte. Decoding the same bytes a second time
    with the little-endian raw mode of the same size yields the low bytes, which restores the full 16-bit values.
    Returns None (the caller then keeps Pillow's high bytes and records that) where this is not possible.
    """
    tile = image.tile
    if image.format != "PNG" or len(tile) != 1 or tile[0][0] != "zip" or tile[0][3] != f"{image.mode};16B":
        return None
    try:
        low = Image.open(io.BytesIO(data))
        t = low.tile[0]
        args = f"{low.mode};16L"
        low.tile = [t._replace(args=args) if hasattr(t, "_replace") else (t[0], t[1], t[2], args)]
        low.load()
    except Exception:  # this Pillow cannot decode it so, or the data is corrupt: the caller's decode decides
        return None
    image.load()
    high, low_bytes = np.asarray(image), np.asarray(low)
    reduced = np.empty(high.shape, np.uint8)
    for start in range(0, len(high), _REDUCE_ROWS):  # in row blocks: the 16-bit values exist one block at a time
        rows = slice(start, start + _REDUCE_ROWS)
        reduced[rows] = reduce_16_to_8((high[rows].astype(np.uint16) << 8) | low_bytes[rows])
    out = Image.fromarray(reduced, image.mode)
    out.info[SOURCE_BITS_INFO] = (16, ROUND_16_TO_8)
    return out


def decode_source_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """Encoded source image -> fully decoded Pillow image, refusing one over `max_pixels` from its header first.

    The full decode happens here so that truncated files fail inside the writer's skip-and-count block. Where the
    file holds more bits per channel than Pillow's decoded mode shows, `image.info[SOURCE_BITS_INFO]` says so.
    """
    image = open_image(data, max_pixels)
    bits = _decoder_bits(image)
    if bits == 16 and image.mode in ("RGB", "RGBA"):
        rounded = _rgb16_png_rounded(data, image)
        if rounded is not None:
            return rounded
    image.load()
    if bits is None:
        image.info.pop(SOURCE_BITS_INFO, None)
    else:
        high_byte = bits == 16 and image.mode not in GRAY_16_MODES + ("I",)
        image.info[SOURCE_BITS_INFO] = (bits, HIGH_BYTE_16_TO_8 if high_byte else None)
    return image


def to_stored_8bit(image: Image.Image) -> tuple[Image.Image, int, str | None]:
    """What the shards store, and how it was obtained: (image, source bits per channel, conversion or None).

    Grayscale sources become 1-channel "L" (smaller; loaders replicate to RGB on demand), everything else "RGB".
    16-bit grayscale ("I;16*", and "I", which Pillow uses for 16-bit PNG/PGM data) is reduced by
    `reduce_16_to_8`; integer images declaring more than 16 bits are refused (their range is not an image
    convention this pipeline can assume). Pillow "F" (32-bit float) images keep Pillow's convention of values in
    [0, 255], rounded and clipped.
    """
    declared = image.info.get(SOURCE_BITS_INFO)
    mode = image.mode
    if mode in GRAY_16_MODES or mode == "I":
        bits = declared[0] if declared else 16
        if bits > 16:
            raise ValueError(f"{bits}-bit integer images are not supported; convert them to 8 or 16 bits")
        return Image.fromarray(reduce_16_to_8(np.asarray(image)), "L"), 16, ROUND_16_TO_8
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L"), 32, FLOAT_PILLOW_TO_8
    bits, conversion = declared if declared else ((1, ONE_BIT_TO_8) if mode == "1" else (8, None))
    return image.convert("L" if mode in ("L", "1", "LA") else "RGB"), bits, conversion


def as_uint8_hwc(array: np.ndarray) -> np.ndarray:
    """Normalise a source array to uint8 HxW (gray) or HxWx3 (RGB): floats in [0,1] are scaled, uint16 is reduced
    by `reduce_16_to_8`, RGBA loses alpha."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = reduce_16_to_8(a)
    elif a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, uint16, bool or float in [0,1], got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {a.shape}")
    return np.ascontiguousarray(a)


def array_bits(dtype: np.dtype) -> tuple[int, str | None]:
    """(bits per channel, conversion to 8 bits or None) of a source array's dtype, as `as_uint8_hwc` treats it."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return 1, ONE_BIT_TO_8
    if np.issubdtype(dtype, np.floating):
        return dtype.itemsize * 8, FLOAT_UNIT_TO_8
    if dtype == np.uint16:
        return 16, ROUND_16_TO_8
    return dtype.itemsize * 8, None


def array_to_image(array: np.ndarray) -> Image.Image:
    """A source array image as an 8-bit Pillow image that remembers the array's bit depth and conversion."""
    a = np.asarray(array)
    image = Image.fromarray(as_uint8_hwc(a))
    image.info[SOURCE_BITS_INFO] = array_bits(a.dtype)
    return image
