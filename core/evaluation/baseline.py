"""Does the method beat what it refines? Samples of a trained model against samples of its baseline, from the same
starting noise, scored without downloads.

Every energy-based kind defines `TrainedModel.baseline` (what its samples are with zero MCMC steps: the frozen
backbone for VAEBM, NCP-VAE and the joint latent EBM prior, the generator under its N(0, I) prior for LEBM and the
GRBM-prior VAE). For each batch the same generator seed starts both rows, so the rows differ only by the method's
chains. On the built-in digits the score is `DigitsScorer` (a classifier trained on the real digits: its confidence and
a Frechet distance in its features against held-out real digits); other datasets need FID
(`launchers/evaluate.py metric=fid`, which needs Inception weights).

Used by the training job at the end of a run (`report.*`) and by `launchers/evaluate.py metric=digits`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

DIGITS_DATASETS = ("digits",)  # datasets the download-free digits score applies to


@dataclass
class ReportConfig:
    enabled: bool = True  # at the end of training, score the model's samples against its baseline's (digits only)
    num_samples: int = 500  # images per row
    batch_size: int = 100  # images per sampling call
    steps: int | None = None  # MCMC steps of the model's row; None: its test-time length
    seed: int = 0  # the rows' starting noise: batch b uses seed + b for both rows
    scorer_cache_dir: str | None = "~/.cache/vaebm/digits_scorer"  # the digits classifier's weights; None: retrain

    def validate(self) -> None:
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError("report.num_samples must be >= 2 and report.batch_size >= 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError("report.steps must be >= 1 (or null for the model's test-time length)")


def applies(dataset_name: str) -> bool:
    """Whether the download-free score applies to a dataset."""
    return dataset_name in DIGITS_DATASETS


def digits_scorer(cache_dir: str | None = None):
    from core.evaluation.sample_score import DigitsScorer, DigitsScorerConfig

    return DigitsScorer(DigitsScorerConfig(cache_dir=cache_dir))


@torch.no_grad()
def compare_with_baseline(model, scorer, num_samples: int, batch_size: int, seed: int,
                          steps: int | None = None, device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Two score rows, baseline first: `model.sample(.., steps=0)` and `model.sample(.., steps=steps)` on the same
    per-batch generator seeds. Needs `model.baseline` (a plain VAE has none)."""
    from core.methods import SampleOptions

    if getattr(model, "baseline", None) is None:
        raise ValueError(f"model kind {model.kind!r} has no baseline to compare with")
    images: dict[str, list[torch.Tensor]] = {"baseline": [], "model": []}
    for b, start in enumerate(range(0, num_samples, batch_size)):
        k = min(batch_size, num_samples - start)
        for row, options in (("baseline", SampleOptions(steps=0)), ("model", SampleOptions(steps=steps))):
            gen = torch.Generator(device=device).manual_seed(seed + b)
            images[row].append(model.sample(k, gen, options).images.float().cpu())
    rows = []
    for row, name in (("baseline", model.baseline), ("model", model.kind)):
        s = scorer.score(torch.cat(images[row]))
        rows.append({"samples": name, "mean_confidence": round(s["mean_confidence"], 4),
                     "confident_fraction": round(s["confident_fraction"], 4),
                     "frechet_distance": round(s["frechet_distance"], 3)})
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line: whether the model's row beats the baseline's on both scores."""
    base, mine = rows
    better_conf = mine["mean_confidence"] > base["mean_confidence"]
    better_fd = mine["frechet_distance"] < base["frechet_distance"]
    if better_conf and better_fd:
        return (f"{mine['samples']} beats its baseline ({base['samples']}): classifier confidence "
                f"{base['mean_confidence']:.3f} -> {mine['mean_confidence']:.3f}, Frechet distance "
                f"{base['frechet_distance']:.2f} -> {mine['frechet_distance']:.2f}")
    return (f"{mine['samples']} does NOT beat its baseline ({base['samples']}) on "
            f"{'both scores' if not (better_conf or better_fd) else ('confidence' if not better_conf else 'Frechet distance')}: "
            f"confidence {base['mean_confidence']:.3f} -> {mine['mean_confidence']:.3f}, Frechet distance "
            f"{base['frechet_distance']:.2f} -> {mine['frechet_distance']:.2f}")


def metrics_of(rows: list[dict[str, Any]], prefix: str = "report") -> dict[str, float]:
    """Flat metrics: <prefix>/<baseline|model>/<score>."""
    out = {}
    for key, row in zip(("baseline", "model"), rows):
        for k in ("mean_confidence", "confident_fraction", "frechet_distance"):
            out[f"{prefix}/{key}/{k}"] = float(row[k])
    return out
