"""Images users look at: sample grids, chain strips, energy histograms and chain-energy curves (rank 0, written next
to the run)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from core.sampling.langevin import ChainEnergyTrace, LangevinResult


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Model-space images x in [-1, 1] as a PNG grid, converted exactly like FID inputs (clamp, (x+1)/2)."""
    import torchvision

    nrow = nrow or max(int(len(x) ** 0.5), 1)
    torchvision.utils.save_image(((x.float() + 1) / 2).clamp(0, 1).cpu(), path, nrow=nrow)
    return path


def save_points(x: torch.Tensor, path: Path, title: str) -> Path:
    """Samples of a 2-D model as a scatter plot (point data has no image grid); the first two coordinates are
    shown, the axes fitted to the points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = x.detach().float().cpu().reshape(len(x), -1)
    pts = pts[torch.isfinite(pts).all(dim=1)]
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy() if pts.shape[1] > 1 else torch.zeros(len(pts)).numpy(),
               s=2, alpha=0.5, label=f"{len(pts)} samples")
    ax.set_aspect("equal")
    return finish_figure(fig, ax, title, path)


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


def chain_energy_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str,
                      ylabel: str = "mean E (band: ±1 std over chains)") -> Path:
    """Per-step chain energy: for each label, the mean of E over the chains at each Langevin step with a ±std band
    (x: number of updates applied, 0 = the chains' start). `curves` maps a label to (mean, std), each (steps,)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for label, (mean, std) in curves.items():
        mean, std = mean.detach().double().cpu(), std.detach().double().cpu()
        steps = torch.arange(len(mean)).numpy()
        line, = ax.plot(steps, mean.numpy(), lw=1.2, label=label)
        ax.fill_between(steps, (mean - std).numpy(), (mean + std).numpy(), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("Langevin step")
    ax.set_ylabel(ylabel)
    return finish_figure(fig, ax, title, path)


def chain_energy_figure(path: Path, nimg: int, traces: dict[str, "ChainEnergyTrace"],
                        chains: dict[str, "LangevinResult | None"]) -> Path:
    """The chain-energy plot of a method's visuals: each training-chain trace's per-step mean E (±std over the
    chains), averaged over the runs since the previous plot (the trace is read and reset), beside single runs such
    as the test-time chain drawn for the sample grid. Empty traces and missing runs are left out."""
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for label, trace in traces.items():
        averaged = trace.take()
        if averaged is not None:
            curves[label] = averaged
    for label, chain in chains.items():
        if chain is not None and chain.model_energy is not None and chain.model_energy.numel():
            curves[label] = (chain.model_energy, chain.model_energy_std)
    return chain_energy_plot(curves, path, f"chain energy E at nimg={nimg}")


def finish_figure(fig, ax, title: str, path: Path) -> Path:
    """Title and legend on `ax`, then write `fig` to `path` and release it (every plot here ends this way)."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
