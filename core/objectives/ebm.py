"""Contrastive-divergence objective of VAEBM's second stage (vaebm.md Eq. 7 and App. E).

With the VAE frozen, the gradient of the negative log-likelihood w.r.t. the energy parameters psi is
    dL/dpsi = E_{x~p_d}[dE/dpsi] - E_{x~h}[dE/dpsi]                                  (vaebm.md Eq. 7, sign of -log h)
so the surrogate loss E(x+).mean() - E(x-).mean() has exactly that gradient when the negatives x- (Langevin samples)
are treated as constants. Minimising it lowers the energy of data and raises the energy of samples.

Optionally an energy-magnitude penalty mean(E(x+)^2) + mean(E(x-)^2) is added (`energy_magnitude_penalty`): the
stabilizer of Du & Mordatch (2019) for EBMs trained by contrastive divergence. It is not part of VAEBM's image
objective (weight 0 by default); the 2-D likelihood protocol uses it.
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


def energy_magnitude_penalty(e_pos: torch.Tensor, e_neg: torch.Tensor) -> torch.Tensor:
    """mean(E(x+)^2) + mean(E(x-)^2) over per-sample energies of data and negatives.

    Why: the CD loss (vaebm.md Eq. 7) is blind to a constant shift of E and unbounded below while the negatives lag
    the energy, so the energies can drift to large magnitudes; penalizing their squares keeps them near zero. This
    is the energy regularization of Du & Mordatch (2019, "Implicit generation and modeling with energy based
    models"), a known stabilizer for EBMs. Computed in the energies' dtype (vaebm_loss passes them as fp32).
    """
    return e_pos.pow(2).mean() + e_neg.pow(2).mean()


def magnitude_weight_at(progress: float, start: float, final: float | None) -> float:
    """The energy-magnitude penalty's weight at `progress` (fraction of training done): `start`, decaying linearly to
    `final` at the end (None: constant). Early the penalty keeps E near zero while it takes shape (the CD loss is
    blind to a constant shift); late it no longer biases the energy's shape. Never below 0 (float rounding)."""
    if final is None:
        return start
    return max(0.0, start + (final - start) * min(max(progress, 0.0), 1.0))


@dataclass
class VAEBMLoss:
    loss: torch.Tensor  # cd + alpha_s * spectral (+ magnitude_weight * magnitude): the scalar to backpropagate
    cd: torch.Tensor  # contrastive divergence E(x+).mean() - E(x-).mean() (detached)
    gap: torch.Tensor  # energy gap E(x-).mean() - E(x+).mean() = -cd; grows large once the EBM overfits (App. E)
    e_pos: torch.Tensor  # E(x+).mean() on data (detached)
    e_neg: torch.Tensor  # E(x-).mean() on Langevin samples (detached)
    spectral: torch.Tensor  # the spectral-norm sum before scaling by alpha_s (detached)
    magnitude: torch.Tensor | None = None  # energy_magnitude_penalty before weighting (detached); None at weight 0

    def metrics(self) -> dict[str, float]:
        """Python floats for logging (one host sync for all terms)."""
        names = ["loss", "cd", "gap", "e_pos", "e_neg", "spectral"]
        terms = [self.loss.detach(), self.cd, self.gap, self.e_pos, self.e_neg, self.spectral]
        if self.magnitude is not None:
            names.append("magnitude")
            terms.append(self.magnitude)
        return dict(zip(names, torch.stack(terms).tolist()))


def vaebm_loss(e_pos: torch.Tensor, e_neg: torch.Tensor, spectral: torch.Tensor, alpha_s: float,
               magnitude_weight: float = 0.0) -> VAEBMLoss:
    """CD loss plus the spectral regularizer: L = cd + alpha_s * sum_i sigma(W_i) (vaebm.md App. E; alpha_s 0.2,
    0.3 for CelebA-HQ 256). `spectral` is EnergyNet.spectral_penalty() of this step. With `magnitude_weight` > 0,
    L += magnitude_weight * energy_magnitude_penalty(e_pos, e_neg) in fp32; at 0 (the default) the penalty is neither
    computed nor added."""
    if alpha_s < 0:
        raise ValueError(f"alpha_s must be >= 0, got {alpha_s}")
    if magnitude_weight < 0:
        raise ValueError(f"magnitude_weight must be >= 0, got {magnitude_weight}")
    pos, neg = e_pos.float().mean(), e_neg.float().mean()  # fp32 means: energies may come out of bf16 autocast
    cd = contrastive_divergence_loss(e_pos.float(), e_neg.float())
    loss = cd + alpha_s * spectral.float()
    magnitude = None
    if magnitude_weight > 0:
        magnitude = energy_magnitude_penalty(e_pos.float(), e_neg.float())
        loss = loss + magnitude_weight * magnitude
        magnitude = magnitude.detach()
    return VAEBMLoss(loss=loss, cd=cd.detach(), gap=(neg - pos).detach(), e_pos=pos.detach(), e_neg=neg.detach(),
                     spectral=spectral.detach().float(), magnitude=magnitude)
