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


class BestWeights:
    """The weights with the highest finite score so far (higher is better): `consider` after each score, `restore`
    at the end. The one best-keeping rule of the job's model selection and of the 2-D protocol's rows."""

    def __init__(self) -> None:
        self.score = -math.inf  # best finite score so far
        self.step = -1  # where it was reached (images seen for the job, a step for the rows; -1: none yet)
        self.history: list[list[float]] = []  # [step, score] of every score
        self.weights: dict[str, torch.Tensor] | None = None  # the best weights (CPU copies)

    def consider(self, step: int, score: float, module: torch.nn.Module) -> bool:
        """Record `score` at `step`; keep a copy of `module`'s weights if it is the best finite one. True if kept."""
        self.history.append([step, score])
        if math.isfinite(score) and score > self.score:
            self.score, self.step = score, step
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            return True
        return False

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the best weights into `module`; False (module untouched) when no finite score was seen."""
        if self.weights is None:
            return False
        module.load_state_dict(self.weights, strict=True)
        return True


class ModelSelection:
    """Scores the trained module at an interval and keeps its best weights (`best`). Checkpointed by the job under
    the name `selection`."""

    def __init__(self, score: Callable[[torch.nn.Module], float], every_nimg: int):
        if every_nimg <= 0:
            raise ValueError(f"model selection needs every_nimg > 0, got {every_nimg}")
        self.score_fn = score  # module -> held-out score (higher is better); NaN/inf never selected
        self.every_nimg = every_nimg  # images between scores (and one at the end of training)
        self.best = BestWeights()  # step = images seen
        self.last_nimg = 0  # images seen at the last score

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
        self.best.consider(cur_nimg, value, module)
        return value

    def summary(self) -> dict[str, Any]:
        """What the run records about the choice (selection.json, MLflow)."""
        return {"best_score": self.best.score, "best_nimg": self.best.step, "every_nimg": self.every_nimg,
                "history": self.best.history}

    def state_dict(self) -> dict[str, Any]:
        b = self.best
        return {"best_score": b.score, "best_nimg": b.step, "last_nimg": self.last_nimg, "history": b.history,
                "weights": b.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        b = self.best
        b.score, b.step = float(state["best_score"]), int(state["best_nimg"])
        b.history, b.weights = [list(h) for h in state["history"]], state["weights"]
        self.last_nimg = int(state["last_nimg"])
