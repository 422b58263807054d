"""The end-of-run comparison of a method with its baseline (core/evaluation/baseline.py): both rows start from the
same noise, the rows are scored by the digits classifier, and the verdict follows the numbers."""
from __future__ import annotations

import torch

from core.evaluation.baseline import compare_with_baseline, digits_scorer, metrics_of, verdict
from core.evaluation.sample_score import DigitsScorer, DigitsScorerConfig
from core.methods import SampleOptions, Samples, TrainedModel


class _Blend(TrainedModel):
    """A model whose chains move its starting noise towards real digits: steps=0 gives the noise itself (the
    baseline), k steps give (1 - a^k) digits + a^k noise. Records the starting noise of every call."""

    baseline = "noise"
    kind = "blend"

    def __init__(self, digits: torch.Tensor):
        self.digits = digits
        self.starts: list[tuple[int, torch.Tensor]] = []

    @classmethod
    def from_bundle(cls, bundle, weights):
        raise NotImplementedError

    def to(self, device, dtype=torch.float32):
        return self

    def sample(self, n, generator, options=None):
        steps = 4 if options is None or options.steps is None else options.steps
        noise = torch.rand(n, *self.digits.shape[1:], generator=generator) * 2 - 1
        idx = torch.randint(len(self.digits), (n,), generator=generator)
        self.starts.append((steps, noise))
        w = 0.5 ** steps
        return Samples((1 - w) * self.digits[idx] + w * noise)


def test_rows_start_from_the_same_noise_and_the_verdict_follows_the_scores(tmp_path):
    scorer = DigitsScorer(DigitsScorerConfig(cache_dir=str(tmp_path)))
    model = _Blend(scorer.heldout_images())
    rows = compare_with_baseline(model, scorer, num_samples=120, batch_size=50, seed=3, steps=4)
    assert [r["samples"] for r in rows] == ["noise", "blend"]
    # three batches (50, 50, 20), each drawn twice from the same seed: the starting noise is identical
    assert [s for s, _ in model.starts] == [0, 4] * 3
    for (_, a), (_, b) in zip(model.starts[::2], model.starts[1::2]):
        assert torch.equal(a, b)
    base, mine = rows
    assert mine["mean_confidence"] > base["mean_confidence"] + 0.3
    assert mine["frechet_distance"] < base["frechet_distance"]
    assert verdict(rows).startswith("blend beats its baseline (noise)")
    assert verdict([mine, base]).startswith("noise does NOT beat its baseline (blend) on both scores")
    m = metrics_of(rows)
    assert m["report/model/mean_confidence"] == mine["mean_confidence"]
    assert set(m) == {f"report/{r}/{k}" for r in ("baseline", "model")
                      for k in ("mean_confidence", "confident_fraction", "frechet_distance")}
    assert isinstance(digits_scorer(str(tmp_path)), DigitsScorer)  # reuses the cached weights


def test_a_model_without_baseline_is_refused(tmp_path):
    model = _Blend(torch.zeros(2, 1, 8, 8))
    model.baseline = None
    try:
        compare_with_baseline(model, None, 4, 2, 0)
    except ValueError as err:
        assert "no baseline" in str(err)
    else:
        raise AssertionError("expected a ValueError")
    assert SampleOptions(steps=0).steps == 0
