"""Model selection on held-out data: the published model is the trained module's weights with the best score.

Some methods have no converged end point (an EBM's likelihood rises, peaks and drifts as its chains lag the energy),
so a job may be given a `ModelSelection`: a score function of the trained module (higher is better, computed on
held-out data the training never sees) and an interval. The loop scores the module every `every_nimg` images and at
the end; the best finite score's weights are kept (in memory and in every checkpoint, so a resumed run selects
exactly as an uninterrupted one), and the job publishes them instead of the last weights. Every rank scores its own
copy: the weights are identical on all ranks, so the choice is too.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


class ModelSelection:
    """Keeps the trained module's best-scoring weights. Checkpointed by the job under the name `selection`."""

    def __init__(self, score: Callable[[torch.nn.Module], float], every_nimg: int):
        if every_nimg <= 0:
            raise ValueError(f"model selection needs every_nimg > 0, got {every_nimg}")
        self.score_fn = score  # module -> held-out score (higher is better); NaN/inf never selected
        self.every_nimg = every_nimg  # images between scores (and one at the end of training)
        self.best_score = -math.inf  # best finite score so far
        self.best_nimg = -1  # images seen when it was reached (-1: none yet)
        self.last_nimg = 0  # images seen at the last score
        self.history: list[list[float]] = []  # [nimg, score] of every score
        self.weights: dict[str, torch.Tensor] | None = None  # the best weights (CPU copies)

    def due(self, cur_nimg: int, finished: bool) -> bool:
        """A score is due when an interval boundary was crossed since the last one, or at the end of training."""
        if cur_nimg <= self.last_nimg:
            return False
        return finished or cur_nimg // self.every_nimg > self.last_nimg // self.every_nimg

    @torch.no_grad()
    def consider(self, module: torch.nn.Module, cur_nimg: int) -> float:
        """Score `module` now; keep its weights if the score is the best finite one. Returns the score."""
        was_training = module.training
        module.eval()
        try:
            value = float(self.score_fn(module))
        finally:
            module.train(was_training)
        self.last_nimg = cur_nimg
        self.history.append([float(cur_nimg), value])
        if math.isfinite(value) and value > self.best_score:
            self.best_score, self.best_nimg = value, cur_nimg
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        return value

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the best weights into `module`; False (module untouched) when no finite score was seen."""
        if self.weights is None:
            return False
        module.load_state_dict(self.weights, strict=True)
        return True

    def summary(self) -> dict[str, Any]:
        """What the run records about the choice (selection.json, MLflow)."""
        return {"best_score": self.best_score, "best_nimg": self.best_nimg, "every_nimg": self.every_nimg,
                "history": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_nimg": self.best_nimg, "last_nimg": self.last_nimg,
                "history": self.history, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_nimg = int(state["best_nimg"])
        self.last_nimg = int(state["last_nimg"])
        self.history = [list(h) for h in state["history"]]
        self.weights = state["weights"]
