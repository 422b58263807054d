"""The digits sample score: a classifier trained on the built-in digits ranks real digits above noise, blank images
and mixtures, in order; its histogram exposes mode collapse; its weight cache is reused bit for bit and never trusted
when damaged."""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.evaluation.sample_score import (
    DigitsScorer,
    DigitsScorerConfig,
    cache_path,
    real_digits,
    settings_hash,
    split_indices,
)

# A fast, weak configuration for the cache-corruption cases (trains in well under a second).
TINY = dict(epochs=1, widths=(4, 4, 4), feature_dim=8, outliers_per_batch=4)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits_scorer_cache")


@pytest.fixture(scope="module")
def scorer(cache_dir) -> DigitsScorer:
    """The default scorer, trained once for the whole module (a few seconds on one core)."""
    return DigitsScorer(DigitsScorerConfig(cache_dir=str(cache_dir)))


@pytest.fixture(scope="module")
def real(scorer) -> torch.Tensor:
    return scorer.heldout_images()


@pytest.fixture(scope="module")
def noise(real) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.rand(real.shape, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def train_digits(scorer) -> torch.Tensor:
    """The real digits of the training split: real, but not the reference images themselves."""
    images, labels = real_digits(scorer.config.source_size, scorer.config.resize_filter)
    train_idx, _ = split_indices(labels, scorer.config.heldout_fraction, scorer.config.seed)
    return images[train_idx].to(torch.float32) / 127.5 - 1.0


def test_classifier_accuracy_on_heldout_split(scorer, real):
    assert scorer.heldout_accuracy >= 0.95
    assert real.shape == (540, 1, 32, 32) and real.min() >= -1 and real.max() <= 1
    assert torch.bincount(scorer.heldout_labels, minlength=10).min() >= 50  # stratified split


def test_real_digits_score_near_the_top(scorer, real, train_digits):
    for images in (real, train_digits, real[::2]):
        r = scorer.score(images)
        assert r["mean_confidence"] >= 0.9
        assert r["confident_fraction"] >= 0.85
        assert 0.0 <= r["frechet_distance"] < 20.0
    assert scorer.score(real)["frechet_distance"] < 1e-6  # the reference set against itself


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "black", "gray", "white", "shuffled_pixels"])
def test_noise_and_blank_score_near_the_bottom(scorer, real, noise, kind):
    g = torch.Generator().manual_seed(7)
    images = {
        "uniform": noise,
        "gaussian": (torch.randn(real.shape, generator=g) * 0.5).clamp(-1, 1),
        "black": torch.full_like(real, -1.0),
        "gray": torch.zeros_like(real),
        "white": torch.ones_like(real),
        # real pixel statistics, no digit structure: a kind of non-digit the classifier never saw in training
        "shuffled_pixels": real.flatten(1)[:, torch.randperm(real[0].numel(), generator=g)].view_as(real),
    }[kind]
    r = scorer.score(images)
    assert r["mean_confidence"] < 0.5
    assert r["confident_fraction"] < 0.05
    assert r["frechet_distance"] > 500.0


def test_mixtures_score_in_between_monotone_in_the_noise_fraction(scorer, real, noise):
    n = len(real)
    scores = []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        k = round(frac * n)
        scores.append(scorer.score(torch.cat([real[k:], noise[:k]])))
    conf = [s["mean_confidence"] for s in scores]
    share = [s["confident_fraction"] for s in scores]
    fd = [s["frechet_distance"] for s in scores]
    assert all(a > b + 0.05 for a, b in zip(conf, conf[1:])), conf
    assert all(a > b for a, b in zip(share, share[1:])), share
    assert all(a < b for a, b in zip(fd, fd[1:])), fd
    assert fd[1] > 10 * max(fd[0], 1.0)


def test_histogram_uniform_on_real_digits_and_concentrated_on_threes(scorer, real):
    r = scorer.score(real)
    hist = torch.tensor(r["class_histogram"])
    assert hist.shape == (10,) and math.isclose(float(hist.sum()), 1.0)
    assert sum(r["class_counts"]) == r["num_images"] == len(real)
    assert float((hist - 0.1).abs().max()) < 0.03
    assert 0.5 * float((hist - 0.1).abs().sum()) < 0.05  # total variation from uniform

    threes = real[scorer.heldout_labels == 3]
    assert len(threes) >= 50
    r3 = scorer.score(threes)
    assert int(torch.tensor(r3["class_histogram"]).argmax()) == 3
    assert r3["class_histogram"][3] >= 0.9
    assert r3["frechet_distance"] > 100.0  # one class is far from the ten-class reference: mode collapse shows here too


def test_any_channel_count_size_and_dtype(scorer, real):
    base = scorer.predict_proba(real)
    rgb = scorer.predict_proba(real.expand(-1, 3, -1, -1))
    assert torch.equal(base, rgb)  # replicated grayscale is the same image
    colour = torch.cat([torch.full_like(real, -1.0), real, real.flip(-1)], dim=1)  # channels differ: grayscale mean
    gray = scorer.predict_proba(colour.mean(dim=1, keepdim=True))
    assert torch.allclose(scorer.predict_proba(colour), gray, atol=0.02)
    u8 = torch.round((real + 1) * 127.5).to(torch.uint8)
    assert torch.equal(base, scorer.predict_proba(u8))
    assert torch.equal(base, scorer.predict_proba(real.numpy()))
    for side in (16, 64):
        resized = F.interpolate(real, size=side, mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)
        r = scorer.score(resized.expand(-1, 3, -1, -1))
        assert r["mean_confidence"] >= 0.9 and r["frechet_distance"] < 20.0, (side, r)
    with pytest.raises(ValueError):
        scorer.score(torch.zeros(4, 1, 16, 8))
    with pytest.raises(ValueError):
        scorer.score(torch.zeros(4, 2, 16, 16))


def test_scores_do_not_depend_on_batching_and_one_image_has_no_distance(scorer, real, noise):
    images = torch.cat([real[:100], noise[:37]])
    small = DigitsScorer.__new__(DigitsScorer)
    small.__dict__.update(scorer.__dict__)
    small.config = DigitsScorerConfig(cache_dir=scorer.config.cache_dir, score_batch_size=16)
    a, b = scorer.score(images), small.score(images)
    assert a["class_counts"] == b["class_counts"]
    assert math.isclose(a["mean_confidence"], b["mean_confidence"], rel_tol=1e-6)
    assert math.isclose(a["frechet_distance"], b["frechet_distance"], rel_tol=1e-6)
    one = scorer.score(real[:1])
    assert one["num_images"] == 1 and math.isnan(one["frechet_distance"])
    assert scorer.features(real[:5]).shape == (5, scorer.config.feature_dim)


def test_cache_key_covers_training_settings_only():
    base = DigitsScorerConfig()
    assert settings_hash(base) == settings_hash(DigitsScorerConfig(cache_dir="/x", confidence_threshold=0.5,
                                                                   score_batch_size=7))
    for change in (dict(seed=1), dict(resolution=20), dict(epochs=3), dict(widths=(8, 16, 32)),
                   dict(outlier_weight=0.0), dict(heldout_fraction=0.2)):
        assert settings_hash(DigitsScorerConfig(**change)) != settings_hash(base), change
    with pytest.raises(ValueError):
        DigitsScorerConfig(resolution=18)


def test_second_scorer_loads_the_cache_bit_for_bit(scorer, cache_dir, real, noise):
    assert not scorer.loaded_from_cache and scorer.cache_file == cache_path(scorer.config)
    assert scorer.cache_file.is_file() and scorer.cache_file.parent == cache_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = DigitsScorer(DigitsScorerConfig(cache_dir=str(cache_dir)))
    assert again.loaded_from_cache
    for name, value in scorer.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[name]), name
    images = torch.cat([real, noise])
    assert torch.equal(scorer.predict_proba(images), again.predict_proba(images))
    assert torch.equal(scorer.features(images), again.features(images))
    assert scorer.score(images) == again.score(images)
    assert again.heldout_accuracy == scorer.heldout_accuracy


def test_truncated_cache_file_is_retrained_with_a_warning(scorer, tmp_path, real):
    shutil.copy(scorer.cache_file, tmp_path / scorer.cache_file.name)
    path = tmp_path / scorer.cache_file.name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="retraining"):
        retrained = DigitsScorer(DigitsScorerConfig(cache_dir=str(tmp_path)))
    assert not retrained.loaded_from_cache
    # training is deterministic: the same weights again, and the file is whole again
    assert torch.equal(retrained.predict_proba(real), scorer.predict_proba(real))
    assert DigitsScorer(DigitsScorerConfig(cache_dir=str(tmp_path))).loaded_from_cache
    assert not list(tmp_path.glob("*.tmp"))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    Path(path).write_text("unpickled")


def _corrupt(path: Path, kind: str, tmp_path: Path) -> None:
    if kind == "garbage":
        path.write_bytes(b"not a torch file" * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickled_code":
        torch.save({"meta.settings_hash": _RunsCodeWhenUnpickled(tmp_path / "marker")}, path)
        assert not (tmp_path / "marker").exists()
    else:
        payload = torch.load(path, weights_only=True)
        if kind == "other_settings":
            payload["meta.settings_hash"] = torch.tensor(list(b"0123456789abcdef"), dtype=torch.uint8)
        elif kind == "wrong_shapes":
            payload["model.head.weight"] = torch.zeros(3, 3)
        elif kind == "tampered_weights":
            payload["model.head.weight"] = torch.zeros_like(payload["model.head.weight"])
        elif kind == "not_tensors":
            payload["meta.heldout_correct"] = 5
        torch.save(payload, path)


@pytest.mark.parametrize("kind", ["garbage", "empty", "pickled_code", "other_settings", "wrong_shapes",
                                  "tampered_weights", "not_tensors"])
def test_damaged_or_mismatched_cache_is_retrained_not_trusted(tmp_path, kind):
    cache = tmp_path / "cache"
    config = DigitsScorerConfig(cache_dir=str(cache), **TINY)
    first = DigitsScorer(config)
    probe = first.heldout_images()[:64]
    expected = first.predict_proba(probe)
    _corrupt(cache_path(config), kind, tmp_path)
    with pytest.warns(RuntimeWarning, match="retraining"):
        second = DigitsScorer(config)
    assert not second.loaded_from_cache
    assert not (tmp_path / "marker").exists()  # weights_only loading never ran the pickled code
    assert torch.equal(second.predict_proba(probe), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DigitsScorer(config).loaded_from_cache  # the rewritten file is trusted again
