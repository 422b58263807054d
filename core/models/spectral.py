"""Spectral regularization by batched power iteration (NVAE Sec. 3.2; vaebm.md App. E applies it to the energy net too).

The penalty is sum_i sigma_max(W_i) over every weight-normalized conv, W reshaped to (C_out, C_in*k*k). Weights of
equal shape are stacked so one batched matmul advances all their power iterations at once. The singular-vector
estimates live in module buffers: they are saved in checkpoints, so a resumed run continues the same iteration.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.models.layers import WNConv2d


def _matrix(conv: WNConv2d) -> torch.Tensor:
    w = conv.normalized_weight()
    return w.reshape(w.shape[0], -1)


class SpectralRegularizer(nn.Module):
    """Keeps left/right singular-vector estimates for a fixed set of convs and returns sum of spectral norms.

    `layers` are referenced, not registered: they stay owned by the model that holds this regularizer.
    """

    def __init__(self, layers: list[WNConv2d], power_iterations: int = 4, warmup_factor: int = 10):
        super().__init__()
        self.power_iterations = power_iterations
        self.warmup_factor = warmup_factor  # the first call runs warmup_factor x more iterations from random vectors
        groups: dict[tuple[int, int], list[int]] = {}
        for index, layer in enumerate(layers):
            rows = layer.weight.shape[0]
            cols = layer.weight[0].numel()
            groups.setdefault((rows, cols), []).append(index)
        self._layers = list(layers)
        self._groups = sorted(groups.items())
        for g, ((rows, cols), members) in enumerate(self._groups):
            self.register_buffer(f"u{g}", F.normalize(torch.randn(len(members), rows), dim=1, eps=1e-3))
            self.register_buffer(f"v{g}", F.normalize(torch.randn(len(members), cols), dim=1, eps=1e-3))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # The same flag as a Python bool: forward branches on it without reading the device (a host sync every step,
        # and a graph break under torch.compile). The buffer stays the checkpointed truth; a load refreshes this.
        self._warm = False
        self.register_load_state_dict_post_hook(SpectralRegularizer._refresh_warm)

    @staticmethod
    def _refresh_warm(module: "SpectralRegularizer", incompatible_keys) -> None:
        module._warm = bool(module.initialized)  # once per checkpoint load, not per step

    def buffers_restored(self) -> None:
        """The buffers were overwritten in place (a training step skipped for a non-finite loss restores them):
        re-read the warm-up flag, so a discarded first call is warmed up again."""
        self._warm = bool(self.initialized)

    def stacked_weights(self) -> list[torch.Tensor]:
        return [torch.stack([_matrix(self._layers[i]) for i in members]) for _, members in self._groups]

    def forward(self) -> torch.Tensor:
        """Advance the power iterations (no grad) and return sum_i u_i^T W_i v_i (differentiable in W)."""
        iterations = self.power_iterations * (1 if self._warm else self.warmup_factor)
        total = torch.zeros((), device=self.initialized.device)
        for g, weights in enumerate(self.stacked_weights()):
            u, v = getattr(self, f"u{g}"), getattr(self, f"v{g}")
            with torch.no_grad():
                w = weights.detach().to(u.dtype)
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), w).squeeze(1), dim=1, eps=1e-3)
                    u = F.normalize(torch.bmm(w, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
                getattr(self, f"u{g}").copy_(u)
                getattr(self, f"v{g}").copy_(v)
            sigma = torch.bmm(u.unsqueeze(1).to(weights.dtype), torch.bmm(weights, v.unsqueeze(2).to(weights.dtype)))
            total = total + sigma.sum()
        self.initialized.fill_(True)
        self._warm = True
        return total

    def estimates(self) -> list[torch.Tensor]:
        """Current per-layer spectral-norm estimates (ordered like the constructor's `layers`), without iterating."""
        out = [torch.empty(())] * len(self._layers)
        for g, ((_, _), members) in enumerate(self._groups):
            weights = torch.stack([_matrix(self._layers[i]) for i in members]).detach()
            u, v = getattr(self, f"u{g}"), getattr(self, f"v{g}")
            sig = torch.bmm(u.unsqueeze(1), torch.bmm(weights.to(u.dtype), v.unsqueeze(2))).flatten()
            for k, i in enumerate(members):
                out[i] = sig[k]
        return out


def batchnorm_penalty(module: nn.Module) -> torch.Tensor:
    """NVAE's BN regularizer: sum over affine BN layers of max |gamma| (keeps BN from undoing the spectral bound)."""
    terms = [m.weight.abs().max() for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(terms).sum() if terms else torch.zeros(())
