"""A sample-quality score for the built-in digits that needs no download.

FID needs the Inception weights file; the quickstart's digits do not. `DigitsScorer` trains a small CNN on a fixed,
seeded split of the real digits (sklearn's 1,797 8x8 digits, upscaled the way the shard writer stores them) and scores
a batch of images in [-1, 1] (NCHW, 1 or 3 channels, any square size) by:
- how confidently the classifier recognises a digit (mean max-softmax, share of images at or above a threshold),
- the Frechet distance between the classifier's penultimate-layer features of the images and of the held-out real
  digits (the same distance as FID, `core.evaluation.fid.frechet_distance`, on 64-d features instead of 2048-d),
- the predicted-class histogram, where mode collapse shows up as mass on few classes.

The classifier is also trained to give a uniform prediction on synthetic non-digits (uniform and Gaussian noise, blank
and low-frequency blob images; "outlier exposure"), so confidence says "looks like a digit" and not merely "is closer
to one class than to the others". The numbers are comparable only between runs with the same `DigitsScorerConfig`.

Training takes a few seconds on one CPU core. With `cache_dir` set, the weights are stored as a flat dict of tensors
(`torch.save`, read back with `weights_only=True`, so nothing is unpickled) under a name holding a hash of the training
settings; a file that cannot be read, belongs to other settings, or does not reproduce its recorded held-out accuracy is
retrained and rewritten with a warning instead of being trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from core.evaluation.fid import FeatureStats, FIDStatistics, fid_between, to_uint8
from data_pipelines.builtin_sets import BUILTIN_SETS_DEFAULT_SIZE, digits_source
from data_pipelines.image_prep import prepare_image

NUM_CLASSES = 10
CACHE_FORMAT = 1  # bump when the network or the file layout changes: old cache files then no longer match
# Settings that do not change the trained weights; they are left out of the cache key.
_NOT_TRAINING_SETTINGS = ("cache_dir", "confidence_threshold", "score_batch_size")


@dataclass
class DigitsScorerConfig:
    seed: int = 0  # seeds the train/held-out split, the initialisation, shuffling, augmentation and outlier images
    resolution: int = 16  # side of the classifier's input (a multiple of 4); every image is resized to it
    source_size: int = BUILTIN_SETS_DEFAULT_SIZE["digits"]  # side the 8x8 digits are upscaled to, as the writer does
    resize_filter: str = "lanczos"  # PIL filter for that upscaling (the data config's default `resize_filter`)
    heldout_fraction: float = 0.3  # stratified share of the 1,797 digits kept out of training (reference set)
    epochs: int = 12  # passes over the training split
    batch_size: int = 64  # real digits per optimisation step
    learning_rate: float = 3e-3  # Adam step size (cosine-decayed to 0 over training)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    widths: tuple[int, int, int] = (16, 32, 64)  # output channels of the three conv layers
    feature_dim: int = 64  # width of the penultimate layer, the features the Frechet distance compares
    max_shift: int = 1  # training augmentation: random translation by up to this many pixels (0: none)
    outlier_weight: float = 0.5  # weight of the uniform-prediction loss on synthetic non-digits (0: no outliers)
    outliers_per_batch: int = 16  # synthetic non-digit images added to each step when outlier_weight > 0
    cache_dir: str | None = None  # directory for the trained weights; None: train in memory every time
    confidence_threshold: float = 0.9  # an image counts as "confident" when its max softmax is at least this
    score_batch_size: int = 512  # images per forward pass when scoring (memory only; results do not depend on it)
    device: str = field(default="cpu", compare=False)  # where scoring runs; training always runs on the CPU

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.resolution < 4 or self.resolution % 4:
            raise ValueError(f"resolution must be a positive multiple of 4, got {self.resolution}")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {self.widths}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}")
        if self.epochs < 1 or self.batch_size < 1 or self.score_batch_size < 1:
            raise ValueError("epochs, batch_size and score_batch_size must be positive")


def training_settings(config: DigitsScorerConfig) -> dict:
    """The settings that determine the trained weights (the cache key's input)."""
    settings = {k: v for k, v in asdict(config).items() if k not in _NOT_TRAINING_SETTINGS and k != "device"}
    settings["widths"] = list(config.widths)
    settings["cache_format"] = CACHE_FORMAT
    return settings


def settings_hash(config: DigitsScorerConfig) -> str:
    """16 hex digits of the sha256 of the training settings: the cache file's name and its recorded key."""
    text = json.dumps(training_settings(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(config: DigitsScorerConfig) -> Path | None:
    if config.cache_dir is None:
        return None
    return Path(config.cache_dir).expanduser() / f"digits_scorer_{settings_hash(config)}.pt"


# ---------------------------------------------------------------------------------------------------------------------
# Data


def real_digits(source_size: int, resize_filter: str) -> tuple[torch.Tensor, np.ndarray]:
    """All 1,797 built-in digits as uint8 (N, 1, S, S), upscaled as the shard writer stores them, and their labels."""
    source = digits_source()
    images = np.stack([np.asarray(prepare_image(item.load(), source_size, "center", resize_filter))
                       for item in source.items])
    labels = np.array([item.label for item in source.items], dtype=np.int64)
    return torch.from_numpy(images).unsqueeze(1), labels


def split_indices(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, held-out) index split, sorted."""
    train, heldout = train_test_split(np.arange(len(labels)), test_size=heldout_fraction, stratify=labels,
                                      random_state=seed)
    return np.sort(train), np.sort(heldout)


def to_classifier_input(images: torch.Tensor | np.ndarray, resolution: int) -> torch.Tensor:
    """Images in [-1, 1] (or uint8), NCHW with 1 or 3 channels and any square size -> float32 (N, 1, R, R) in [-1, 1].

    Floats are clamped and rounded to 8 bits first (`fid.to_uint8`, the path data and FID samples take), channels are
    averaged to grayscale, and the side is resized with antialiased bilinear interpolation (the data loaders' filter).
    """
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
        raise ValueError(f"expected square NCHW images with 1 or 3 channels, got shape {tuple(x.shape)}")
    x = to_uint8(x.detach()).to(torch.float32).mean(dim=1, keepdim=True) / 255.0
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def synthetic_outliers(n: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """`n` non-digit images in [-1, 1] at `resolution`: uniform noise, Gaussian noise, blank (constant) images and
    low-frequency blobs (2x2..4x4 noise upsampled), in equal shares."""
    kinds = torch.randint(0, 4, (n,), generator=generator)
    out = torch.empty(n, 1, resolution, resolution)
    uniform = torch.rand(n, 1, resolution, resolution, generator=generator) * 2 - 1
    gauss = (torch.randn(n, 1, resolution, resolution, generator=generator) * 0.5).clamp(-1, 1)
    blank = (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1).expand(-1, 1, resolution, resolution)
    side = int(torch.randint(2, 5, (1,), generator=generator))
    blobs = F.interpolate(torch.rand(n, 1, side, side, generator=generator) * 2 - 1, size=(resolution, resolution),
                          mode="bilinear", align_corners=False)
    for k, src in enumerate((uniform, gauss, blank, blobs)):
        out[kinds == k] = src[kinds == k]
    # the same 8-bit rounding every scored image goes through
    return to_classifier_input(out, resolution)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels in each direction (background fill -1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


# ---------------------------------------------------------------------------------------------------------------------
# Network


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers (two 2x2 max-pools), a `feature_dim` penultimate layer and a 10-way linear head."""

    def __init__(self, resolution: int, widths: tuple[int, int, int], feature_dim: int):
        super().__init__()
        c1, c2, c3 = widths
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Linear(c3 * (resolution // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features)."""
        f = self.features(x)
        return self.head(f), f


def train_classifier(config: DigitsScorerConfig, x_train: torch.Tensor, y_train: torch.Tensor) -> DigitsCNN:
    """Deterministic for a given config (all randomness comes from generators seeded with `config.seed`)."""
    with torch.random.fork_rng(devices=[]):  # parameter init uses the global generator; leave the caller's alone
        torch.manual_seed(config.seed)
        model = DigitsCNN(config.resolution, config.widths, config.feature_dim)
    gen = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = -(-len(x_train) // config.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            x = random_shift(x_train[idx], config.max_shift, gen)
            logits, _ = model(x)
            loss = F.cross_entropy(logits, y_train[idx])
            if config.outlier_weight > 0 and config.outliers_per_batch > 0:
                out_logits, _ = model(synthetic_outliers(config.outliers_per_batch, config.resolution, gen))
                # cross-entropy to the uniform distribution over the 10 classes
                loss = loss - config.outlier_weight * F.log_softmax(out_logits, dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# Cache


def _key_tensor(key: str) -> torch.Tensor:
    return torch.tensor(list(key.encode()), dtype=torch.uint8)


def save_weights(model: DigitsCNN, path: Path, key: str, heldout_correct: int) -> None:
    """Flat dict of tensors, written atomically (temp file + rename) so a killed job leaves no half-written file."""
    payload = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload["meta.settings_hash"] = _key_tensor(key)
    payload["meta.heldout_correct"] = torch.tensor(heldout_correct, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights(path: Path, key: str, config: DigitsScorerConfig) -> tuple[DigitsCNN, int]:
    """The cached network and its recorded held-out correct count; raises ValueError on any problem with the file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle that needs more than tensors
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise ValueError("not a flat dict of tensors")
    stored = payload.get("meta.settings_hash")
    if stored is None or bytes(stored.tolist()).decode(errors="replace") != key:
        raise ValueError("written for other training settings")
    if "meta.heldout_correct" not in payload:
        raise ValueError("no recorded held-out accuracy")
    model = DigitsCNN(config.resolution, config.widths, config.feature_dim)
    state = {k[len("model."):]: v for k, v in payload.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or shapes
        raise ValueError(f"weights do not fit the network ({e})") from e
    return model.eval(), int(payload["meta.heldout_correct"])


# ---------------------------------------------------------------------------------------------------------------------
# Scorer


class DigitsScorer:
    """Trains (or loads) the digits classifier and scores batches of images; see the module docstring.

    Attributes: `config`, `model`, `heldout_accuracy` (share of the held-out digits classified correctly),
    `reference` (FIDStatistics of the held-out digits' features), `loaded_from_cache`, `cache_file`.
    """

    def __init__(self, config: DigitsScorerConfig | None = None):
        self.config = config = config or DigitsScorerConfig()
        images, labels = real_digits(config.source_size, config.resize_filter)
        train_idx, heldout_idx = split_indices(labels, config.heldout_fraction, config.seed)
        self._heldout_u8 = images[heldout_idx]
        self.heldout_labels = torch.from_numpy(labels[heldout_idx])
        x_heldout = to_classifier_input(self._heldout_u8, config.resolution)

        key = settings_hash(config)
        self.cache_file = cache_path(config)
        self.loaded_from_cache = False
        model = None
        if self.cache_file is not None and self.cache_file.exists():
            try:
                model, recorded = load_weights(self.cache_file, key, config)
                if self._correct(model, x_heldout) != recorded:
                    raise ValueError("weights do not reproduce the recorded held-out accuracy")
                self.loaded_from_cache = True
            except ValueError as e:
                warnings.warn(f"digits scorer cache {self.cache_file} not used, retraining: {e}", RuntimeWarning,
                              stacklevel=2)
                model = None
        if model is None:
            x_train = to_classifier_input(images[train_idx], config.resolution)
            model = train_classifier(config, x_train, torch.from_numpy(labels[train_idx]))
            if self.cache_file is not None:
                save_weights(model, self.cache_file, key, self._correct(model, x_heldout))

        self.model = model.to(config.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.heldout_accuracy = self._correct(self.model, x_heldout) / len(x_heldout)
        _, _, stats = self._forward(self._heldout_u8)
        self.reference: FIDStatistics = stats.statistics()

    @torch.no_grad()
    def _correct(self, model: DigitsCNN, x: torch.Tensor) -> int:
        device = next(model.parameters()).device
        logits, _ = model(x.to(device))
        return int((logits.argmax(dim=1).cpu() == self.heldout_labels).sum())

    def heldout_images(self) -> torch.Tensor:
        """The held-out real digits as the data pipeline feeds them: float32 (N, 1, source_size, source_size) in
        [-1, 1]. Their labels are `heldout_labels`."""
        return self._heldout_u8.to(torch.float32) / 127.5 - 1.0

    @torch.no_grad()
    def _forward(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, FeatureStats]:
        """Softmax probabilities (N, 10) on the CPU, predicted classes, and feature statistics, in batches."""
        images = torch.as_tensor(images)
        device = next(self.model.parameters()).device
        stats = FeatureStats(self.config.feature_dim)
        probs = []
        for start in range(0, len(images), self.config.score_batch_size):
            x = to_classifier_input(images[start:start + self.config.score_batch_size], self.config.resolution)
            logits, feats = self.model(x.to(device))
            probs.append(F.softmax(logits.float(), dim=1).cpu())
            stats.update(feats.cpu())
        p = torch.cat(probs) if probs else torch.empty(0, NUM_CLASSES)
        return p, p.argmax(dim=1), stats

    def predict_proba(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, 10) class probabilities of images in [-1, 1] (or uint8), NCHW, 1 or 3 channels, any square size."""
        return self._forward(images)[0]

    @torch.no_grad()
    def features(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(N, feature_dim) penultimate-layer features, the ones the Frechet distance compares."""
        device = next(self.model.parameters()).device
        out = [self.model.features(to_classifier_input(images[s:s + self.config.score_batch_size],
                                                       self.config.resolution).to(device)).cpu()
               for s in range(0, len(images), self.config.score_batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.config.feature_dim)

    def score(self, images: torch.Tensor | np.ndarray) -> dict:
        """Scores of a batch of images (at least 2 for the Frechet distance):

        num_images; mean_confidence: mean max-softmax probability (higher: more digit-like); confident_fraction:
        share with max-softmax >= config.confidence_threshold; frechet_distance: between the images' features and
        the held-out real digits' (lower: closer to real digits; NaN for fewer than 2 images); class_histogram: share
        of images predicted as each of the 10 classes (uniform for real digits, concentrated under mode collapse);
        class_counts: the same as counts.
        """
        probs, pred, stats = self._forward(images)
        n = len(probs)
        if n == 0:
            raise ValueError("score needs at least one image")
        conf = probs.max(dim=1).values
        counts = torch.bincount(pred, minlength=NUM_CLASSES)
        # max(0, .): the distance of a set to itself comes out as round-off of either sign
        fd = max(0.0, fid_between(stats.statistics(), self.reference)) if n >= 2 else float("nan")
        return {
            "num_images": n,
            "mean_confidence": float(conf.mean()),
            "confident_fraction": float((conf >= self.config.confidence_threshold).float().mean()),
            "frechet_distance": fd,
            "class_histogram": (counts.double() / n).tolist(),
            "class_counts": counts.tolist(),
        }
