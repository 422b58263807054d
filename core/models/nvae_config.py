"""Typed NVAE configuration. The defaults are the CPU quickstart backbone; the papers' backbones are presets in
conf/nvae/<name>.yaml, written as differences from these defaults (vaebm.md App. E; the VAEBM README's NVAE flags).

A model is always rebuilt from this dataclass plus a state dict (`strict=True`); nothing is pickled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class NVAEConfig:
    image_size: int = 32  # height = width of the (square) input image
    in_channels: int = 3  # image channels
    num_channels_enc: int = 16  # base width of the encoder; doubles at every down-sampling
    num_channels_dec: int = 16  # base width of the decoder; halves at every up-sampling
    num_latent_scales: int = 2  # spatial scales that hold latent groups
    num_groups_per_scale: int = 2  # latent groups per scale (at the highest-resolution scale if ada_groups)
    ada_groups: bool = False  # halve the group count at each coarser scale (NVAE's adaptive groups)
    min_groups_per_scale: int = 1  # floor for ada_groups
    num_latent_per_group: int = 8  # channels of each latent group
    num_preprocess_blocks: int = 1  # encoder pre-processing blocks, each ends with a stride-2 cell
    num_preprocess_cells: int = 2  # cells per pre-processing block
    num_postprocess_blocks: int = 1  # decoder post-processing blocks, each starts with an up-sampling cell
    num_postprocess_cells: int = 2  # cells per post-processing block
    num_cell_per_cond_enc: int = 1  # encoder cells between two latent groups
    num_cell_per_cond_dec: int = 1  # decoder cells between two latent groups
    use_se: bool = True  # squeeze-and-excitation at the end of every residual cell
    res_dist: bool = True  # residual posterior: q parameters are offsets from the prior's (NVAE Eq. 2)
    num_nf: int = 0  # shift-only autoregressive flow cells (pairs) per group in q(z|x) (NVAE Sec. 3.2); 0: none
    num_x_bits: int = 8  # bits per channel of the input images (5 for CelebA-HQ-256, as in NVAE)
    min_sigma: float = 1e-2  # floor added to every Normal scale (NVAE's parameterization)

    def __post_init__(self) -> None:
        down = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        checks = [
            (self.num_preprocess_blocks == self.num_postprocess_blocks,
             "num_preprocess_blocks must equal num_postprocess_blocks so the decoder ends at the input resolution"),
            (self.image_size % down == 0,
             f"image_size {self.image_size} must be divisible by 2**(preprocess_blocks + latent_scales - 1) = {down}"),
            (self.num_latent_scales >= 1 and self.num_groups_per_scale >= 1, "need at least one scale and one group"),
            (self.num_preprocess_cells >= 1 and self.num_postprocess_cells >= 1, "pre/post blocks need >= 1 cell"),
            (self.num_x_bits in range(1, 9), "num_x_bits must be in 1..8"),
            (self.min_sigma > 0, "min_sigma must be positive"),
            (self.num_nf >= 0, "num_nf must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"NVAEConfig: {message}")

    @property
    def groups_per_scale(self) -> list[int]:
        """Groups at each scale, coarsest (top of the decoder) first."""
        counts, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):  # from the finest scale up, as NVAE counts them
            counts.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return counts[::-1]

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_scale)

    @property
    def top_resolution(self) -> int:
        return self.image_size // 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of every latent group, top (coarsest) group first."""
        shapes = []
        for scale, count in enumerate(self.groups_per_scale):
            res = self.top_resolution * 2**scale
            shapes += [(self.num_latent_per_group, res, res)] * count
        return shapes

    def at_test_size(self) -> "NVAEConfig":
        """Same topology (scales, ada groups, SE, residual posterior), small widths: for float64 tests on CPU."""
        down = 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)
        return dataclasses.replace(
            self, image_size=2 * down, num_channels_enc=8, num_channels_dec=8, num_latent_per_group=3,
            num_groups_per_scale=min(self.num_groups_per_scale, 3 if not self.ada_groups else 4),
            num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_preprocess_cells=min(self.num_preprocess_cells, 2),
            num_postprocess_cells=min(self.num_postprocess_cells, 2))
