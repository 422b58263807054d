"""launchers/sample.py at scale: image i is a function of (seed, batch_size, i), never of the number of ranks.

The same command on one rank (plain `python`, PNGs) and on two (`deepspeed --num_gpus 2`, CPU/gloo, the npz) writes
the same images: byte-identical grids, and a `samples.npz` (one file, arr_0 uint8 NHWC in index order, as the
guided-diffusion FID evaluator reads it) equal to the PNGs. The reference for the images is the documented scheme
computed here by hand: block b of the indices, drawn by `model.sample` with a generator seeded by numpy's
SeedSequence([seed, b]).

The model is a tiny VAEBM (NVAE backbone + energy network, Langevin test-time chains) published as a model directory
with seeded random weights: what is checked is the sampling job, which any weights exercise the same way.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.evaluation.sampling import (Block, SampleConfig, block_seed, merge_parts, part_path, sample_blocks)
from launch import ROOT, free_port, launch_env

N, B, SEED = 10, 4, 3  # blocks [0,4) [4,8) [8,10): rank 0 of two draws blocks 0 and 2, rank 1 block 1
STEPS = 2


def write_tiny_vaebm(model_dir: Path) -> Path:
    """A 16x16 one-channel VAEBM with seeded random weights, as a model directory the jobs load."""
    from presets import energy_preset, nvae_preset

    from core.methods.nvae import float_state, vae_bundle
    from core.methods.vaebm import SamplerConfig
    from core.models import NVAE
    from core.models.energy import EnergyNet
    from core.sampling.langevin import LangevinConfig
    from core.tracking.model_files import write_model_dir

    torch.manual_seed(0)
    backbone = NVAE(nvae_preset("digits16", image_size=16, num_channels_enc=8, num_channels_dec=8))
    energy_cfg = energy_preset("cifar10", image_size=16, in_channels=1, base_channels=8)
    energy = EnergyNet(energy_cfg)
    sampler = SamplerConfig(langevin=LangevinConfig(num_steps=STEPS, step_size=5e-4), test_steps=STEPS)
    bundle = {"kind": "vaebm", "energy": dataclasses.asdict(energy_cfg), "backbone": vae_bundle(backbone),
              "sampler": dataclasses.asdict(sampler)}
    weights = {f"energy.{k}": v for k, v in float_state(energy).items()}
    weights.update({f"backbone.{k}": v.detach().cpu() for k, v in backbone.state_dict().items()})
    return write_model_dir(model_dir, bundle, weights)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_vaebm(tmp_path_factory.mktemp("sample-model") / "model")


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> dict[tuple[int, str], tuple[Path, str]]:
    """{(ranks, format): (out dir, stdout)}: the same command on one rank writing PNGs and on two writing the npz
    (launched together; they share nothing but the model directory)."""
    tmp = tmp_path_factory.mktemp("sample-runs")
    env = launch_env(tmp, None)
    procs = {}
    for ranks, fmt in ((1, "png"), (2, "npz")):
        out = tmp / f"r{ranks}-{fmt}"
        args = [str(ROOT / "launchers/sample.py"), f"model={model_dir}", f"n={N}", f"batch_size={B}",
                f"seed={SEED}", f"format={fmt}", f"out={out}", "tracking.enabled=false"]
        launcher = [] if ranks == 1 else ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                                           str(free_port())]
        procs[ranks, fmt] = out, subprocess.Popen([sys.executable, *launcher, *args], cwd=tmp, env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                  start_new_session=True)
    done = {}
    for key, (out, proc) in procs.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{key}:\n{text[-4000:]}"
        done[key] = out, text
    return done


def _png(path: Path) -> np.ndarray:
    """uint8 (C, H, W) as Pillow decodes it."""
    img = np.asarray(Image.open(path))
    return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)


def test_blocks_are_the_same_at_any_world_size():
    for n, b in [(10, 4), (12, 4), (3, 8), (1, 1), (17, 5)]:
        whole = sample_blocks(n, b)
        assert [(x.start, x.stop) for x in whole] == [(s, min(n, s + b)) for s in range(0, n, b)]
        for world in (1, 2, 3, 8):
            dealt = [sample_blocks(n, b, r, world) for r in range(world)]
            assert sorted((x for d in dealt for x in d), key=lambda x: x.index) == whole
            for r, mine in enumerate(dealt):
                assert [x.index for x in mine] == list(range(r, len(whole), world))  # round-robin
    assert sample_blocks(N, B, 0, 2) == [Block(0, 0, 4), Block(2, 8, 10)]
    # the documented seed: numpy's SeedSequence([seed, block]), first 64-bit word shifted to 63 bits
    assert block_seed(SEED, 2) == int(np.random.SeedSequence([SEED, 2]).generate_state(2, np.uint64)[0] >> 1)


def test_images_are_the_documented_blocks(runs, model_dir):
    """Image i = to_uint8(model.sample(len(block), Generator(SeedSequence([seed, b])))[i - start]), by hand."""
    from core.evaluation.fid import to_uint8
    from core.evaluation.sampling import load_trained_model

    out, _ = runs[1, "png"]
    model = load_trained_model(str(model_dir), torch.device("cpu"), None)
    for b, start in enumerate(range(0, N, B)):
        k = min(B, N - start)
        seed = int(np.random.SeedSequence([SEED, b]).generate_state(2, np.uint64)[0] >> 1)
        expected = to_uint8(model.sample(k, torch.Generator().manual_seed(seed),
                                         SampleConfig().options()).images).numpy()
        for j in range(k):
            np.testing.assert_array_equal(_png(out / f"{start + j:06d}.png"), expected[j], err_msg=f"image {start+j}")
    assert len({_png(out / f"{i:06d}.png").tobytes() for i in range(N)}) == N  # no two chains drew the same noise


def test_one_and_two_ranks_write_the_same_grid_and_chain_strip(runs):
    """One rank writing PNGs and two ranks writing the npz: the grid and chain strip are byte-identical (the images
    themselves: the npz test below), each run saying what it wrote on how many ranks."""
    one, text1 = runs[1, "png"]
    two, text2 = runs[2, "npz"]
    assert sorted(p.name for p in one.glob("0*.png")) == [f"{i:06d}.png" for i in range(N)]
    for name in ["grid.png", "chains.png"]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert f"wrote {N} samples (one PNG each) to {one} in" in text1 and "on 1 rank(s)" in text1
    assert "on 2 rank(s)" in text2


def test_npz_is_one_nhwc_uint8_array_in_index_order(runs):
    out, text = runs[2, "npz"]
    assert sorted(p.name for p in out.iterdir()) == ["chains.png", "grid.png", "samples.npz"]  # parts removed
    assert "samples.npz, arr_0 uint8 NHWC" in text
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 16, 16, 1)
    pngs = runs[1, "png"][0]
    for i in range(N):
        np.testing.assert_array_equal(arr[i], _png(pngs / f"{i:06d}.png").transpose(1, 2, 0), err_msg=f"image {i}")


def test_merge_streams_uneven_parts_in_index_order(tmp_path):
    """Three ranks' parts (blocks of 2 over 11 images: 2 + 2 + ... + 1) merge into what np.savez would write."""
    n, b, world = 11, 2, 3
    images = np.random.default_rng(0).integers(0, 256, (n, 5, 4, 3), dtype=np.uint8)  # non-square H, W
    for r in range(world):
        np.save(part_path(tmp_path, r), np.concatenate([images[x.start:x.stop] for x in sample_blocks(n, b, r, world)]))
    np.save(part_path(tmp_path, 7), images[:1])  # a stale part of an earlier run on more ranks
    merge_parts(tmp_path, n, b, world)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
    with np.load(tmp_path / "samples.npz") as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], images)
    np.savez(tmp_path / "reference.npz", images)  # numpy's own writer: same member, same array
    with np.load(tmp_path / "reference.npz") as f:
        np.testing.assert_array_equal(f["arr_0"], images)

    np.save(part_path(tmp_path, 0), images[:4])  # rank 1's part never arrived (no shared file system)
    with pytest.raises(FileNotFoundError, match="all ranks share"):
        merge_parts(tmp_path, n, b, world)


def test_fid_scores_the_images_sample_writes(runs, model_dir):
    """evaluate.py metric=fid draws with the same blocks: same seed, batch_size and count -> the same images."""
    from core.dist import DistInfo
    from core.evaluation.fid import to_uint8
    from core.evaluation.jobs import EvaluateConfig, fid_sample_batches
    from core.evaluation.sampling import load_trained_model

    model = load_trained_model(str(model_dir), torch.device("cpu"), None)
    config = EvaluateConfig(model=str(model_dir), fid_samples=N, batch_size=B, seed=SEED, progress=False)
    arr = np.load(runs[2, "npz"][0] / "samples.npz")["arr_0"]
    for world in (1, 2):
        got = {}
        for r in range(world):
            info = DistInfo(r, world, 0, torch.device("cpu"))
            blocks = sample_blocks(N, B, r, world)
            for block, x in zip(blocks, fid_sample_batches(model, config, info)):
                got.update(zip(range(block.start, block.stop), to_uint8(x).permute(0, 2, 3, 1).numpy()))
        np.testing.assert_array_equal(np.stack([got[i] for i in range(N)]), arr)
