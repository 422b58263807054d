"""Load-time value transforms: the single definition of scaling and quantization that both loader backends follow
(the DALI pipeline in dali_loader.py mirrors `to_model_range` op for op; tests compare the two bit for bit).
"""
from __future__ import annotations

import torch


def quantize(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Reduce [0,1] images to `num_bits` per channel, NVAE's recipe: floor(x*255 / 2**(8-bits)) / (2**bits - 1).

    x*255 is rounded before the floor because x came from u8/255 in float32, where 5/255*255 can land at 4.9999995
    and flooring it would drop a level. The result is again in [0,1].
    """
    if num_bits == 8:
        return x
    levels = torch.round(x * 255.0)
    return torch.floor(levels / float(2 ** (8 - num_bits))) / float(2**num_bits - 1)


def to_model_range(images_u8: torch.Tensor, num_bits: int = 8, centered: bool = True) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW in [0,1] (or [-1,1] if `centered`, what NVAE consumes), optionally quantized.

    Works from the integer values so no float rounding enters before the floor; the DALI pipeline performs exactly
    these float32 operations in the same order (tests compare the two bit for bit).
    """
    x = images_u8.to(torch.float32)
    if num_bits == 8:
        x = x / 255.0
    else:
        x = torch.floor(x / float(2 ** (8 - num_bits))) / float(2**num_bits - 1)
    if centered:
        x = x * 2.0 - 1.0
    return x


def from_model_range(x: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Inverse scaling for sample grids and FID: float NCHW in model range -> uint8 NCHW."""
    if centered:
        x = (x + 1.0) / 2.0
    return torch.clamp(torch.round(x * 255.0), 0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------- dynamic binarization
_M32 = 0xFFFFFFFF


def _hash32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors holding values in [0, 2^32) (xor-shift-multiply rounds). Every product
    stays below 2^59, so the arithmetic is exact on any device and no signed overflow or arithmetic shift occurs."""
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) & _M32
    return h ^ (h >> 16)


def binarization_uniforms(seed: int, positions: torch.Tensor, numel: int) -> torch.Tensor:
    """(B, numel) float32 uniforms in [0, 1), a pure function of (seed, stream position of the sample, pixel index):
    the same on CPU and GPU, for any world size or batch split, and again after a resume."""
    device = positions.device
    pos = positions.to(torch.int64).reshape(-1, 1)
    pixel = torch.arange(numel, device=device, dtype=torch.int64).reshape(1, -1)
    h = _hash32(torch.full((1, 1), seed & _M32, dtype=torch.int64, device=device) ^ 0x9E3779B9)
    h = _hash32(h ^ (pos & _M32))
    h = _hash32(h ^ ((pos >> 32) & _M32))
    h = _hash32(h ^ pixel)
    return (h >> 8).to(torch.float32) / float(1 << 24)


def dynamic_binarize(x: torch.Tensor, seed: int, positions: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Dynamic binarization (a fresh Bernoulli draw each time a sample is seen): pixel = 1 with probability equal to
    its intensity in [0, 1]. `x` is a model-range batch (B, C, H, W) ([-1, 1] if `centered`, else [0, 1]);
    `positions` (B,) are the samples' positions in the loader's stream (BatchPlan.positions), so a sample gets new
    noise every epoch. Returns the same range with only the two extreme values."""
    p = (x + 1.0) / 2.0 if centered else x
    u = binarization_uniforms(seed, positions, p[0].numel()).reshape(p.shape)
    b = (u < p).to(x.dtype)
    return b * 2.0 - 1.0 if centered else b
