"""NVAE (Vahdat & Kautz 2020) with the Gaussian decoder VAEBM needs (vaebm.md App. E).

Structure (NVAE Fig. 2): stem -> pre-processing (stride-2 blocks) -> bottom-up encoder tower over latent scales ->
top-down decoder tower that samples one latent group per combiner -> post-processing (up-sampling blocks) ->
Normal p(x|z) over x in [-1, 1]. The top group's prior is the Normal with raw parameters (0, 0), i.e. N(0, 1.01^2)
under NVAE's sigma = exp(log sigma) + 0.01 (as the official implementation samples and scores it); every other group's
prior is a Normal whose parameters come from the decoder state before it, and its posterior is a residual offset from
that prior. With `num_nf > 0`, q(z|x) ends with shift-only autoregressive flow cells (NVAE Sec. 3.2); the generative
path (prior and decoder) never uses them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.models.cells import Cell, DecoderCombiner, EncoderCombiner, FlowCell
from core.models.distributions import DiagNormal
from core.models.interface import LatentGroup, TowerPass
from core.models.layers import WNConv2d
from core.models.noise_space import ChooseZ, NoiseSpaceVAE
from core.models.nvae_config import NVAEConfig
from core.models.spectral import SpectralRegularizer, batchnorm_penalty


class NVAE(NoiseSpaceVAE):
    def __init__(self, config: NVAEConfig):
        super().__init__()
        self.config = config
        c = config
        gps = c.groups_per_scale  # coarsest first
        L = c.num_latent_scales

        # --- encoder: stem and pre-processing, each block ends with a stride-2 cell that doubles the width.
        self.stem = WNConv2d(c.in_channels, c.num_channels_enc, 3, padding=1)
        pre, mult = [], 1
        for _ in range(c.num_preprocess_blocks):
            for i in range(c.num_preprocess_cells):
                width = c.num_channels_enc * mult
                if i == c.num_preprocess_cells - 1:
                    pre.append(Cell(width, 2 * width, "down", "enc", c.use_se))
                    mult *= 2
                else:
                    pre.append(Cell(width, width, "normal", "enc", c.use_se))
        self.preprocess = nn.ModuleList(pre)

        # --- bottom-up tower: finest scale first. After each group but the very last, the feature is kept for the
        # encoder combiner of the matching decoder group.
        self.enc_scales = nn.ModuleList()
        self.enc_down = nn.ModuleList()
        for s in range(L):
            width = c.num_channels_enc * mult
            groups = gps[L - 1 - s]
            self.enc_scales.append(nn.ModuleList(
                nn.Sequential(*[Cell(width, width, "normal", "enc", c.use_se) for _ in range(c.num_cell_per_cond_enc)])
                for _ in range(groups)))
            if s < L - 1:
                self.enc_down.append(Cell(width, 2 * width, "down", "enc", c.use_se))
                mult *= 2
        top_width_enc = c.num_channels_enc * mult
        self.enc0 = nn.Sequential(nn.ELU(), WNConv2d(top_width_enc, top_width_enc, 1), nn.ELU())

        # --- top-down tower: coarsest scale first, starting from a learned constant feature map.
        top = c.top_resolution
        self.prior_ftr0 = nn.Parameter(torch.rand(c.num_channels_dec * mult, top, top))
        self.dec_cells = nn.ModuleList()  # before every group but the first: num_cell_per_cond_dec cells
        self.dec_combiners = nn.ModuleList()
        self.prior_heads = nn.ModuleList()  # ELU + 1x1 conv -> (mu, log sigma) of p(z_l | z_<l), l >= 1
        self.enc_combiners = nn.ModuleList()  # enc feature + conv(decoder state), l >= 1
        self.posterior_heads = nn.ModuleList()  # 3x3 conv -> (mu, log sigma) of q(z_l | x, z_<l)
        self.flows = nn.ModuleList()  # num_nf flow cells per group, applied to q's Normal draw (empty if num_nf=0)
        self.dec_up = nn.ModuleList()
        self._scale_of_group: list[int] = []
        zc = c.num_latent_per_group
        for s in range(L):
            width_dec, width_enc = c.num_channels_dec * mult, c.num_channels_enc * mult
            for g in range(gps[s]):
                first = s == 0 and g == 0
                if not first:
                    self.dec_cells.append(nn.Sequential(
                        *[Cell(width_dec, width_dec, "normal", "dec", c.use_se) for _ in range(c.num_cell_per_cond_dec)]))
                    self.prior_heads.append(nn.Sequential(nn.ELU(), WNConv2d(width_dec, 2 * zc, 1)))
                    self.enc_combiners.append(EncoderCombiner(width_enc, width_dec))
                self.posterior_heads.append(WNConv2d(width_enc, 2 * zc, 3, padding=1))
                self.flows.append(nn.Sequential(*[FlowCell(zc) for _ in range(c.num_nf)]))
                self.dec_combiners.append(DecoderCombiner(width_dec, zc))
                self._scale_of_group.append(s)
            if s < L - 1:
                self.dec_up.append(Cell(width_dec, width_dec // 2, "up", "dec", c.use_se))
                mult //= 2

        # --- post-processing: each block starts with an up-sampling cell that halves the width.
        post = []
        for _ in range(c.num_postprocess_blocks):
            for i in range(c.num_postprocess_cells):
                width = c.num_channels_dec * mult
                if i == 0:
                    post.append(Cell(width, width // 2, "up", "post", c.use_se))
                    mult //= 2
                else:
                    post.append(Cell(width, width, "normal", "post", c.use_se))
        self.postprocess = nn.ModuleList(post)
        self.image_head = nn.Sequential(nn.ELU(), WNConv2d(c.num_channels_dec * mult, 2 * c.in_channels, 3, padding=1))

        self.spectral = SpectralRegularizer([m for m in self.modules() if isinstance(m, WNConv2d)])

    # ----------------------------------------------------------------------------------------------- shapes
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        return self.config.latent_shapes()

    def x_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.image_size, self.config.image_size)

    # ---------------------------------------------------------------------------------------------- encoder
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottom-up pass: the top feature (for q(z_1|x)) and one feature per later group, in decoder order."""
        h = self.stem(x)
        for cell in self.preprocess:
            h = cell(h)
        features = []
        for s, groups in enumerate(self.enc_scales):
            for cells in groups:
                h = cells(h)
                features.append(h)
            if s < len(self.enc_down):
                h = self.enc_down[s](h)
        features.pop()  # the last group's output is the top feature itself
        return self.enc0(h), features[::-1]

    # --------------------------------------------------------------------------------------------- the walk
    def _normal(self, params: torch.Tensor) -> DiagNormal:
        mu, log_sigma = params.chunk(2, dim=1)
        return DiagNormal.from_nvae_params(mu, log_sigma, self.config.min_sigma)

    def walk(self, batch: int, choose_z: ChooseZ, x: torch.Tensor | None = None) -> TowerPass:
        """One top-down pass. With `x`, `choose_z` returns the draw of q's Normal part; with `num_nf > 0` the group's
        flow cells then shift it into z (the draw is kept as `LatentGroup.z_q`). Without `x`, its value is z."""
        if x is not None:
            top_feature, enc_features = self.encode(x)
        state = self.prior_ftr0.unsqueeze(0).expand(batch, -1, -1, -1)
        groups: list[LatentGroup] = []
        up = 0
        for l, combiner in enumerate(self.dec_combiners):
            if l > 0:
                if self._scale_of_group[l] != self._scale_of_group[l - 1]:
                    state = self.dec_up[up](state)
                    up += 1
                state = self.dec_cells[l - 1](state)
            context = state
            posterior = None
            if l == 0:
                # NVAE's top prior: raw (mu, log sigma) = (0, 0) through the same parameterization as every Normal.
                zeros = torch.zeros((batch, *self.latent_shapes()[0]), dtype=state.dtype, device=state.device)
                prior = DiagNormal.from_nvae_params(zeros, zeros, self.config.min_sigma)
                if x is not None:
                    posterior = self._normal(self.posterior_heads[0](top_feature))
            else:
                prior_raw = self.prior_heads[l - 1](state)
                prior = self._normal(prior_raw)
                if x is not None:
                    q_raw = self.posterior_heads[l](self.enc_combiners[l - 1](enc_features[l - 1], state))
                    posterior = self._normal(prior_raw + q_raw if self.config.res_dist else q_raw)
            z = choose_z(l, prior, posterior)
            z_q = None
            if posterior is not None and self.config.num_nf > 0:
                z_q, z = z, self.flows[l](z)
            groups.append(LatentGroup(z=z, prior=prior, context=context, posterior=posterior, z_q=z_q))
            state = combiner(state, z)
        for cell in self.postprocess:
            state = cell(state)
        return TowerPass(groups=groups, x_dist=self._normal(self.image_head(state)))

    def log_q_z(self, z: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Per-sample log q(z | x) of given groups (without flow cells; with them use `posterior(x).log_q_z()`)."""
        if self.config.num_nf > 0:
            raise NotImplementedError(
                "NVAE.log_q_z at a given z needs the inverse of the autoregressive flow cells (num_nf > 0), one "
                "pass per latent dimension; use posterior(x).log_q_z(), exact at the posterior's own samples")
        return super().log_q_z(z, x)

    # ------------------------------------------------------------------------------------- regularization
    def spectral_penalty(self) -> torch.Tensor:
        """sum of spectral norms of all convs, one batched power-iteration step (NVAE Sec. 3.2)."""
        return self.spectral()

    def batchnorm_penalty(self) -> torch.Tensor:
        return batchnorm_penalty(self)

