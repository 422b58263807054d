"""Images users look at: sample grids, chain strips and energy histograms (rank 0, written next to the run)."""
from __future__ import annotations

from pathlib import Path

import torch


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Model-space images x in [-1, 1] as a PNG grid, converted exactly like FID inputs (clamp, (x+1)/2)."""
    import torchvision

    nrow = nrow or max(int(len(x) ** 0.5), 1)
    torchvision.utils.save_image(((x.float() + 1) / 2).clamp(0, 1).cpu(), path, nrow=nrow)
    return path


def energy_histogram(e_pos: torch.Tensor | None, e_neg: torch.Tensor, path: Path, title: str) -> Path:
    """Histogram of data (positive) and sample (negative) energies: the gap between them is what training moves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    values = [v for v in (e_pos, e_neg) if v is not None]
    bins = torch.linspace(min(float(v.min()) for v in values), max(float(v.max()) for v in values) + 1e-6, 40)
    if e_pos is not None:
        ax.hist(e_pos.float().numpy(), bins=bins.numpy(), alpha=0.6, label="data E(x+)")
    ax.hist(e_neg.float().numpy(), bins=bins.numpy(), alpha=0.6, label="samples E(x-)")
    ax.set_xlabel("energy")
    return finish_figure(fig, ax, title, path)


def finish_figure(fig, ax, title: str, path: Path) -> Path:
    """Title and legend on `ax`, then write `fig` to `path` and release it (every plot here ends this way)."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
