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
