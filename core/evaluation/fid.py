"""Fréchet Inception Distance with pytorch-fid's InceptionV3, offline weights and exact multi-rank statistics.

These choices differ from the official NVAE/VAEBM evaluation scripts on purpose (DESIGN.md "No downloads at run time"):
- The Inception weights come from a local, checksum-verified file; nothing is downloaded.
- Feature statistics are pooled exactly across ranks: every rank accumulates n, sum f and sum f f^T in float64 and
  the three are all-reduced. Averaging per-rank covariances (the official NVAE code) ignores the spread between the
  rank means and weights unequal shards wrongly, so it is not the covariance of the union.
- Generated images take the same uint8 path as the data: clamp to [-1, 1], (x+1)/2, round to 8 bits. The official
  VAEBM sampler min-max normalizes every image, which changes the pixel distribution and biases FID.
- The Fréchet distance uses symmetric eigendecompositions instead of scipy's sqrtm (see `frechet_distance`).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from data_pipelines.transforms import from_model_range

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048  # pool3 features (pytorch-fid's block 3)
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILENAME)


def _pfi() -> ModuleType:
    """pytorch_fid.inception, imported on first use: it pulls in torchvision (seconds), which statistics and
    distances do not need (spawned metric workers and launchers start faster)."""
    from pytorch_fid import inception

    return inception


class InceptionWeightsError(RuntimeError):
    """The Inception weights file exists but is not the configured one (checksum mismatch or unloadable)."""


@dataclass
class InceptionConfig:
    weights_path: str | None = None  # the weights file, or a directory holding `filename`; None: torch-hub cache only
    filename: str = INCEPTION_FILENAME  # file name looked up in a directory `weights_path` and in the hub cache
    expected_sha256: str = "6726825d"  # hex sha256 of the file, or its first >= 8 digits (pytorch-fid's file name)
    search_hub_cache: bool = True  # also look in torch.hub.get_dir()/checkpoints (honours $TORCH_HOME)
    device: str = "cpu"  # where the network runs ("cuda:0" on GPU workers)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-fA-F]{8,64}", self.expected_sha256):
            raise ValueError("InceptionConfig.expected_sha256 must be 8 to 64 hex digits")


@dataclass
class FIDStatistics:
    """Mean and covariance of Inception features (float64) over `n` images."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


# ---------------------------------------------------------------------------------------------------------------------
# Weights and network


def candidate_weight_paths(config: InceptionConfig) -> list[Path]:
    """Where the weights are looked for, in order."""
    paths: list[Path] = []
    if config.weights_path is not None:
        p = Path(config.weights_path).expanduser()
        paths.append(p / config.filename if p.is_dir() else p)
    if config.search_hub_cache:
        # torch.hub.get_dir() is $TORCH_HUB, else $TORCH_HOME/hub, else ~/.cache/torch/hub: where pytorch-fid's own
        # load_state_dict_from_url would have cached the file on a machine with network access.
        paths.append(Path(torch.hub.get_dir()) / "checkpoints" / config.filename)
    return paths


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def resolve_inception_weights(config: InceptionConfig) -> Path:
    """The first existing candidate, checksum-verified; a clear error naming the file and where to put it otherwise."""
    candidates = candidate_weight_paths(config)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        searched = "\n  ".join(str(p) for p in candidates) or "(no location configured)"
        raise FileNotFoundError(
            f"FID Inception weights '{config.filename}' not found. Searched:\n  {searched}\n"
            f"Download it on a machine with network access from {FID_WEIGHTS_URL} and place it at the configured "
            f"weights path or in {Path(torch.hub.get_dir()) / 'checkpoints'} (set TORCH_HOME to move that cache). "
            "Nothing is downloaded at run time.")
    digest = sha256_of(found)
    if not digest.startswith(config.expected_sha256.lower()):
        raise InceptionWeightsError(
            f"FID Inception weights at {found} have sha256 {digest}, expected one starting with "
            f"{config.expected_sha256.lower()}: the file is corrupt or not '{config.filename}'.")
    return found


def fid_inception_architecture() -> nn.Module:
    """pytorch-fid's FID Inception (`pytorch_fid.inception.fid_inception_v3`) without its weight download.

    Same structure: torchvision's inception_v3 (1008 classes, no aux head, no init) with the TF-compatible blocks.
    """
    pfi = _pfi()
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    return net


def build_inception(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """pytorch-fid's `InceptionV3([3])` (resize to 299, [0,1] -> [-1,1] inside) holding `state_dict`, in eval mode.

    InceptionV3.__init__ builds its trunk with fid_inception_v3(), which downloads; we substitute a builder that
    makes the same architecture and loads the given weights strictly, so the wrapper and its block split stay
    pytorch-fid's own.
    """
    def offline_trunk() -> nn.Module:
        trunk = fid_inception_architecture()
        trunk.load_state_dict(state_dict, strict=True)
        return trunk

    pfi = _pfi()
    with mock.patch.object(pfi, "fid_inception_v3", offline_trunk):
        model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                normalize_input=True, requires_grad=False, use_fid_inception=True)
    return model.eval()


def load_inception(config: InceptionConfig) -> nn.Module:
    """The FID network from the configured, verified weights file, on `config.device`."""
    path = resolve_inception_weights(config)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model = build_inception(state_dict)
    except (RuntimeError, KeyError, ValueError, EOFError) as e:  # a pickle or key mismatch: say which file
        raise InceptionWeightsError(f"FID Inception weights at {path} could not be loaded: {e}") from e
    return model.to(config.device)


# ---------------------------------------------------------------------------------------------------------------------
# Images and features


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images (float in [-1, 1]) -> uint8 NCHW, the path the data took (data_pipelines.transforms).

    uint8 input is returned unchanged, so reference data can be fed straight from the loader.
    """
    if images.dtype == torch.uint8:
        return images
    # float32 first: bf16 samples have 8 mantissa bits, too few to round x*255 to the right level
    return from_model_range(images.to(torch.float32).clamp(-1.0, 1.0), centered=True)


def inception_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1] with 3 channels (grayscale repeated), what InceptionV3 expects."""
    if images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
        raise ValueError(f"expected NCHW images with 1 or 3 channels, got shape {tuple(images_u8.shape)}")
    x = images_u8.to(torch.float32) / 255.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def inception_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, 2048) pool3 features of model-space float images or uint8 images."""
    device = next(model.parameters()).device
    x = inception_input(to_uint8(images.detach()).to(device))
    return model(x)[0].flatten(start_dim=1)


class FeatureStats:
    """Running n, sum f, sum f f^T in float64: sufficient statistics that pool exactly across batches and ranks."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> "FeatureStats":
        """Sum the three statistics over all ranks (no-op without an initialized process group); one collective."""
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device)  # exact below 2^53
            packed = torch.cat([n, self.sum, self.outer.flatten()])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            d = self.sum.numel()
            self.n = int(packed[0].item())
            self.sum = packed[1:1 + d].clone()
            self.outer = packed[1 + d:].view(d, d).clone()
        return self

    def statistics(self) -> FIDStatistics:
        """mu = s/n, sigma = (S - n mu mu^T)/(n - 1): the unbiased covariance np.cov would give on all features."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry; rounding in S - n mu mu^T can break it in the last bit
        return FIDStatistics(mu.cpu().numpy(), sigma.cpu().numpy(), self.n)


def compute_statistics(batches: Iterable[torch.Tensor], model: nn.Module,
                       group: dist.ProcessGroup | None = None) -> FIDStatistics:
    """Inception statistics of this rank's image batches pooled over all ranks (each rank passes its own shard)."""
    stats = FeatureStats(FEATURE_DIM, device=next(model.parameters()).device)
    for images in batches:
        stats.update(inception_features(model, images))
    return stats.all_reduce(group).statistics()


# ---------------------------------------------------------------------------------------------------------------------
# Reference statistics, distance


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_ranks_agree(flag: bool) -> bool:
    """True only if every rank has `flag` (ranks may see a shared file system at different moments)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def reference_cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", key):
        raise ValueError(f"reference statistics key {key!r} must be a file-name-safe string (e.g. a manifest hash)")
    return Path(cache_dir) / f"fid_reference_{key}.npz"


def load_statistics(path: str | os.PathLike) -> FIDStatistics:
    with np.load(path) as f:
        return FIDStatistics(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), int(f["n"]))


def save_statistics(stats: FIDStatistics, path: str | os.PathLike, key: str = "") -> None:
    """Atomic write (temp file + rename): a killed job never leaves a truncated cache that later runs would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), key=np.str_(key))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def reference_stats(batches: Iterable[torch.Tensor], cache_dir: str | os.PathLike, key: str,
                    model: nn.Module) -> FIDStatistics:
    """Statistics of the reference set, computed once and cached as `<cache_dir>/fid_reference_<key>.npz`.

    `key` identifies the data (the caller passes the dataset manifest hash), so a changed data set never reuses stale
    statistics. `batches` (uint8 or model-space images, this rank's shard) is not iterated when the cache is used.
    Collective: every rank must call it.
    """
    path = reference_cache_path(cache_dir, key)
    if _all_ranks_agree(path.is_file()):
        return load_statistics(path)
    stats = compute_statistics(batches, model)
    if _rank() == 0:
        save_statistics(stats, path, key)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # the file exists for everyone once this returns
    return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}) in float64 (Heusel et al., 2017).

    S1 S2 is similar to the symmetric PSD matrix S1^{1/2} S2 S1^{1/2} (exactly for invertible S1, by continuity
    otherwise), so Tr((S1 S2)^{1/2}) is the sum of the square roots of that matrix's eigenvalues. Two symmetric
    eigendecompositions replace pytorch-fid's scipy.linalg.sqrtm of the non-symmetric product: ~5x faster at 2048
    dimensions, and stable when the covariances are rank-deficient (fewer images than features), where sqrtm warns
    and returns complex round-off. Agreement with pytorch-fid's calculate_frechet_distance is tested.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError("FID statistics of different or inconsistent dimensions")
    w, v = np.linalg.eigh(0.5 * (sigma1 + sigma1.T))
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^{1/2}; clip: round-off makes null eigenvalues ~ -1e-16
    inner = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid_between(a: FIDStatistics, b: FIDStatistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def compute_fid(sample_batches: Iterable[torch.Tensor], reference: FIDStatistics, model: nn.Module,
        group: dist.ProcessGroup | None = None) -> float:
    """FID of generated model-space batches (this rank's share) against reference statistics; same on every rank."""
    return fid_between(compute_statistics(sample_batches, model, group), reference)
