"""Contrastive-divergence objective of VAEBM's second stage (vaebm.md Eq. 7 and App. E).

With the VAE frozen, the gradient of the negative log-likelihood w.r.t. the energy parameters psi is
    dL/dpsi = E_{x~p_d}[dE/dpsi] - E_{x~h}[dE/dpsi]                                  (vaebm.md Eq. 7, sign of -log h)
so the surrogate loss E(x+).mean() - E(x-).mean() has exactly that gradient when the negatives x- (Langevin samples)
are treated as constants. Minimising it lowers the energy of data and raises the energy of samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def contrastive_divergence_loss(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """E(x+).mean() - E(x-).mean() over per-sample energies (vaebm.md Eq. 7).

    Means, not sums: the loss (and its gradient) does not grow with the batch, and batches of unequal size work.
    """
    if e_pos.dim() != 1 or e_neg.dim() != 1:
        raise ValueError(f"expected per-sample energies of shape (B,), got {tuple(e_pos.shape)} and "
                         f"{tuple(e_neg.shape)}")
    return e_pos.mean() - e_neg.mean()


@dataclass
class VAEBMLoss:
    loss: torch.Tensor  # cd + alpha_s * spectral: the scalar to backpropagate
    cd: torch.Tensor  # contrastive divergence E(x+).mean() - E(x-).mean() (detached)
    gap: torch.Tensor  # energy gap E(x-).mean() - E(x+).mean() = -cd; grows large once the EBM overfits (App. E)
    e_pos: torch.Tensor  # E(x+).mean() on data (detached)
    e_neg: torch.Tensor  # E(x-).mean() on Langevin samples (detached)
    spectral: torch.Tensor  # the spectral-norm sum before scaling by alpha_s (detached)

    def metrics(self) -> dict[str, float]:
        """Python floats for logging (one host sync for all terms)."""
        names = ("loss", "cd", "gap", "e_pos", "e_neg", "spectral")
        values = torch.stack([self.loss.detach(), self.cd, self.gap, self.e_pos, self.e_neg, self.spectral]).tolist()
        return dict(zip(names, values))


def vaebm_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, spectral: torch.Tensor, alpha_s: float) -> VAEBMLoss:
    """CD loss plus the spectral regularizer: L = cd + alpha_s * sum_i sigma(W_i) (vaebm.md App. E; alpha_s 0.2,
    0.3 for CelebA-HQ 256). `spectral` is EnergyNet.spectral_penalty() of this step."""
    if alpha_s < 0:
        raise ValueError(f"alpha_s must be >= 0, got {alpha_s}")
    pos, neg = e_pos.float().mean(), e_neg.float().mean()  # fp32 means: energies may come out of bf16 autocast
    cd = contrastive_divergence_loss(e_pos.float(), e_neg.float())
    loss = cd + alpha_s * spectral.float()
    return VAEBMLoss(loss=loss, cd=cd.detach(), gap=(neg - pos).detach(), e_pos=pos.detach(), e_neg=neg.detach(),
                     spectral=spectral.detach().float())
