"""FID: exact pooled statistics across ranks, agreement with pytorch-fid, offline checksum-verified weights, and the
full Inception pipeline on real images with stand-in weights (the real file is not available offline)."""
import hashlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from core.evaluation.fid import (FID_WEIGHTS_URL, INCEPTION_FILENAME, FeatureStats, InceptionConfig,
                                 InceptionWeightsError, compute_fid, fid_between, fid_inception_architecture,
                                 frechet_distance, load_inception, reference_stats, to_uint8)

DIM = 12


def _features(n: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)
    return (rng.standard_normal((n, DIM)) @ a + shift).astype(np.float32)


def _stats(features: np.ndarray):
    acc = FeatureStats(features.shape[1])
    for chunk in np.array_split(features, 3):  # several batches, as in evaluation
        acc.update(torch.from_numpy(chunk))
    return acc.statistics()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning")
def test_statistics_match_numpy_and_distance_matches_pytorch_fid():
    # imported here: pytorch-fid pulls in torchvision, which the spawned ranks below need not load
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import FID_WEIGHTS_URL as PYTORCH_FID_URL

    assert FID_WEIGHTS_URL == PYTORCH_FID_URL
    fa, fb = _features(300, 0.0, 1), _features(200, 0.3, 2)
    sa, sb = _stats(fa), _stats(fb)
    # pytorch-fid's calculate_activation_statistics: np.mean(axis=0), np.cov(rowvar=False)
    mu_a, cov_a = fa.astype(np.float64).mean(0), np.cov(fa.astype(np.float64), rowvar=False)
    mu_b, cov_b = fb.astype(np.float64).mean(0), np.cov(fb.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(sa.mu, mu_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(sa.sigma, cov_a, rtol=0, atol=1e-12)
    assert sa.n == 300
    reference = calculate_frechet_distance(mu_a, cov_a, mu_b, cov_b)
    ours = fid_between(sa, sb)
    assert reference > 0.05
    assert abs(ours - reference) <= 1e-9 * reference
    # rank-deficient covariances (fewer samples than dimensions, as with few images and 2048 features)
    few_a, few_b = fa[:8].astype(np.float64), fb[:9].astype(np.float64)
    ref_few = calculate_frechet_distance(few_a.mean(0), np.cov(few_a, rowvar=False), few_b.mean(0),
                                         np.cov(few_b, rowvar=False))
    ours_few = fid_between(_stats(fa[:8]), _stats(fb[:9]))
    assert abs(ours_few - ref_few) <= 1e-6 * ref_few
    # identical sets: zero up to rounding
    assert abs(frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma)) < 1e-6 * np.trace(sa.sigma)


def _pool_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # unequal shards with different means: exactly where averaging per-rank covariances goes wrong
        shard = _features(17, 0.0, 10) if rank == 0 else _features(41, 1.5, 11)
        acc = FeatureStats(DIM)
        acc.update(torch.from_numpy(shard))
        s = acc.all_reduce().statistics()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), mu=s.mu, sigma=s.sigma, n=s.n)
    finally:
        dist.destroy_process_group()


def test_pooled_statistics_over_two_gloo_ranks_equal_single_process(tmp_path):
    mp.spawn(_pool_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    shards = [_features(17, 0.0, 10), _features(41, 1.5, 11)]
    union = np.concatenate(shards).astype(np.float64)
    mu, cov = union.mean(0), np.cov(union, rowvar=False)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as r:  # every rank holds the same global statistics
            assert int(r["n"]) == 58
            np.testing.assert_allclose(r["mu"], mu, rtol=0, atol=1e-12)
            np.testing.assert_allclose(r["sigma"], cov, rtol=0, atol=1e-12)
    # the official NVAE recipe (mean of per-GPU covariances) is measurably different: this test would catch it
    averaged = np.mean([np.cov(s.astype(np.float64), rowvar=False) for s in shards], axis=0)
    assert np.abs(averaged - cov).max() > 0.1


def test_missing_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as e:
        load_inception(InceptionConfig(weights_path=str(tmp_path / "weights")))
    msg = str(e.value)
    assert INCEPTION_FILENAME in msg and str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg


def test_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    bogus = tmp_path / INCEPTION_FILENAME
    bogus.write_bytes(b"not the inception weights")
    with pytest.raises(InceptionWeightsError, match="sha256"):
        load_inception(InceptionConfig(weights_path=str(tmp_path)))
    # also when found in the torch-hub cache rather than at the configured path
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILENAME).write_bytes(b"also wrong")
    with pytest.raises(InceptionWeightsError, match=INCEPTION_FILENAME):
        load_inception(InceptionConfig())


def _write_standin_weights(path) -> str:
    """pytorch-fid's FID Inception architecture with re-initialized convs, saved to `path`; returns its sha256.

    pytorch-fid builds the trunk with init_weights=False; with those default weights the pool3 features are the same
    for every input and FID is 0 for anything. He-normal convs (BN is the identity in eval) keep the activations
    alive through 90+ layers, so features depend on the image as a real network's would.
    """
    gen = torch.Generator().manual_seed(0)
    net = fid_inception_architecture()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * np.sqrt(2.0 / fan_in))
    torch.save(net.state_dict(), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digits_u8(n: int) -> torch.Tensor:
    from sklearn.datasets import load_digits

    d = load_digits().images[:n]
    return torch.from_numpy(np.round(d * (255.0 / 16.0)).astype(np.uint8))[:, None]  # (n, 1, 8, 8) grayscale


def _photos_u8(n: int) -> torch.Tensor:
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    crops = []
    for i in range(n):
        p = photos[i % 3]
        top, left = (37 * i) % (p.shape[0] - 32), (53 * i) % (p.shape[1] - 32)
        crops.append(p[top:top + 32, left:left + 32])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (n, 3, 32, 32)


class _MustNotIterate:
    def __iter__(self):
        raise AssertionError("cached reference statistics were recomputed")


def test_fid_on_real_images_with_standin_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    weights = tmp_path / "standin_inception.pth"
    digest = _write_standin_weights(weights)
    model = load_inception(InceptionConfig(weights_path=str(weights), expected_sha256=digest))

    digits, photos = _digits_u8(16), _photos_u8(16)
    ref = reference_stats(digits.split(8), tmp_path / "cache", "manifest-abc123", model)
    assert ref.n == 16 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    assert (tmp_path / "cache" / "fid_reference_manifest-abc123.npz").is_file()

    # the same images as model-space floats (x = 2u/255 - 1), another order and batching: the uint8 path is exact
    model_space = digits.flip(0).float() / 127.5 - 1.0
    torch.testing.assert_close(to_uint8(model_space), digits.flip(0), rtol=0, atol=0)
    same = compute_fid(model_space.split(5), ref, model)
    different = compute_fid(photos.split(8), ref, model)
    assert different > 0 and np.isfinite(different)
    assert abs(same) < 1e-5 * different  # measured: |same| = 2e-7 * different

    cached = reference_stats(_MustNotIterate(), tmp_path / "cache", "manifest-abc123", model)
    np.testing.assert_array_equal(cached.mu, ref.mu)
    np.testing.assert_array_equal(cached.sigma, ref.sigma)
    with pytest.raises(ValueError):
        reference_stats(_MustNotIterate(), tmp_path / "cache", "../escape", model)
