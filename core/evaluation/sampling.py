"""The sampling job behind `launchers/sample.py`: any registered model that can sample, on any number of ranks.

Image i is the same whatever the number of ranks: the n indices are cut into blocks of `batch_size`, block b is drawn
by one generator seeded from (seed, b), and the blocks are dealt round-robin to the ranks (`sample_blocks`). So
image i is a function of (seed, batch_size, i) and the sampler options. `evaluate.py metric=fid` draws its samples
with the same blocks and seeds: with equal seed, batch_size, steps and n = fid_samples (default sampler options) it
scores exactly the images this job writes.

Energy-based kinds run their test-time chains (16/20/24 Langevin steps for VAEBM, vaebm.md App. E), optionally from
encoded low-temperature VAE samples (`init=low_temperature`); plain VAEs sample ancestrally. The job dispatches on
what the model can do (`TrainedModel.sample`), never on its kind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.tracking import TrackingConfig
from core.training.config import ConfigError


@dataclass
class SampleConfig:
    model: str = "models:/vaebm-digits@latest"  # MLflow model URI, run directory or model directory
    n: int = 64  # samples in total (all ranks together); image i is <out>/<i:06d>.png or samples.npz's arr_0[i]
    out: str = "samples"  # output directory (format=npz: a directory every rank can see)
    # png: one file per image, <i:06d>.png | npz: one file samples.npz, arr_0 = uint8 (n, H, W, C) in index order
    # (the layout of the guided-diffusion / ADM FID evaluator), merged on rank 0 from per-rank parts
    format: str = "png"
    # chains per model call, and the seeding block: images [b*batch_size, (b+1)*batch_size) are drawn together by
    # one generator seeded from (seed, b), blocks dealt round-robin to the ranks (see `sample_blocks`)
    batch_size: int = 64
    seed: int = 0  # image i is a function of (seed, batch_size, i, the sampler options), whatever the world size
    steps: int | None = None  # Langevin steps; None: the model's test-time length (16/20/24 in App. E)
    step_size: float | None = None  # None: the training step size (App. E uses it at test time too)
    temperature: float | None = None  # prior temperature; None: as trained
    init: str = "normal"  # normal: eps ~ N(0, I) | low_temperature: encoded low-temperature VAE samples (App. E)
    init_temperature: float = 0.7  # temperature of those VAE samples
    bn_iterations: int = 20  # BN re-estimation passes for low_temperature init (per block: part of its randomness)
    grid: bool = True  # also write grid.png (samples 0..63) and chains.png (a chain strip) on rank 0
    progress: bool = True  # a progress bar with the ETA on rank 0 (blocks of rank 0; ranks get equal shares +-1)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # only for resolving models:/ URIs
    dist_timeout_s: float = 600.0  # collective timeout
    dry_run: bool = False  # print the resolved config and exit

    def validate(self) -> None:
        def req(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        req(self.n > 0 and self.batch_size > 0, "n and batch_size must be positive")
        req(self.format in ("png", "npz"), f"format must be png or npz, got {self.format!r}")
        req(self.init in ("normal", "low_temperature"), "init must be normal or low_temperature")
        req(self.steps is None or self.steps >= 1, "steps must be >= 1")
        req(self.step_size is None or self.step_size > 0, "step_size must be > 0")
        req(self.seed >= 0, "seed must be >= 0")

    def options(self, strip_frames: int = 0):
        from core.methods import SampleOptions

        return SampleOptions(steps=self.steps, step_size=self.step_size, temperature=self.temperature,
                             init=self.init, init_temperature=self.init_temperature,
                             bn_iterations=self.bn_iterations, strip_frames=strip_frames)


# ------------------------------------------------------------------------------------------------ seeding blocks
# Why blocks and not one seed per image: a model draws a whole batch from one torch.Generator (its chains share the
# generator's stream), and `init=low_temperature` re-estimates BatchNorm statistics on the batch, so an image depends
# on the batch it was drawn in. Fixing the batches (blocks of `batch_size` consecutive indices, the last one shorter)
# and seeding each from (seed, block) makes every image independent of the number of ranks at full batch speed; one
# seed per image would need batches of one.
CHAIN_STRIP_KEY = 0xC4A1  # derive_seed(seed, CHAIN_STRIP_KEY, 1) seeds chains.png, a stream no block uses


@dataclass(frozen=True)
class Block:
    index: int  # b: the block's place in the global order
    start: int  # first image index (b * batch_size)
    stop: int  # one past the last image index (min(n, (b + 1) * batch_size))

    def __len__(self) -> int:
        return self.stop - self.start


def sample_blocks(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[Block]:
    """The blocks of images [b*B, min(n, (b+1)*B)) that `rank` draws: b = rank, rank + world_size, ... (round-robin,
    so every rank gets ceil(n/B)/world_size blocks, +-1)."""
    count = -(-n // batch_size)
    return [Block(b, b * batch_size, min(n, (b + 1) * batch_size)) for b in range(rank, count, world_size)]


def block_seed(seed: int, block: int) -> int:
    """The seed of block `block`'s generator: `core.seeding.derive_seed(seed, block)`."""
    from core.seeding import derive_seed

    return derive_seed(seed, block)


def block_generator(seed: int, block: int, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(block_seed(seed, block))


def load_trained_model(reference: str, device: torch.device, tracking_uri: str | None):
    """Any published model (frozen, eval mode) from an MLflow URI, a run directory or a model directory."""
    from core.methods import build_model
    from core.training.checkpoint import read_model

    bundle, weights = read_model(reference, tracking_uri)
    return build_model(bundle, weights, device)


NPZ_NAME = "samples.npz"  # format=npz: the one output file


def part_path(out: Path, rank: int) -> Path:
    """format=npz: rank `rank`'s images (uint8 NHWC, its blocks in order) until rank 0 merges them."""
    return out / f"samples.rank{rank}.part.npy"


def run_sampling(config: SampleConfig, resolved: dict[str, Any]) -> Path:
    """Every rank draws its blocks of the `n` samples (`sample_blocks`), each from a generator seeded by
    (seed, block): the output is the same on any number of ranks."""
    import numpy as np
    from tqdm import tqdm

    from core import dist as vdist
    from core.evaluation.fid import to_uint8
    from core.tracking import resolve_tracking_uri

    info = vdist.init_distributed(config.dist_timeout_s)
    model = load_trained_model(config.model, info.device, resolve_tracking_uri(config.tracking))
    out = Path(config.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if config.format == "npz":
        _check_shared_dir(out, info.rank, info.world_size)  # before the work, not after it
    blocks = sample_blocks(config.n, config.batch_size, info.rank, info.world_size)
    head: dict[int, np.ndarray] = {}  # images 0..63 this rank drew (NCHW uint8), for grid.png
    part = None  # format=npz: this rank's part, (its image count, H, W, C) uint8, memory-mapped
    t0 = time.perf_counter()
    for j, block in enumerate(tqdm(blocks, desc="sampling", unit="batch", dynamic_ncols=True,
                                   disable=not (info.is_rank0 and config.progress))):
        gen = block_generator(config.seed, block.index, info.device)
        u8 = to_uint8(model.sample(len(block), gen, config.options()).images).cpu()  # the FID conversion
        indices = range(block.start, block.stop)
        if config.format == "png":
            for i, img in zip(indices, u8):
                write_png(img.numpy(), out / f"{i:06d}.png")
        else:
            if part is None:
                count = sum(len(b) for b in blocks)
                part = np.lib.format.open_memmap(part_path(out, info.rank), mode="w+", dtype=np.uint8,
                                                 shape=(count, *u8.shape[2:], u8.shape[1]))
            part[j * config.batch_size: j * config.batch_size + len(block)] = u8.permute(0, 2, 3, 1).numpy()
        head.update((i, img.numpy().copy()) for i, img in zip(indices, u8) if i < 64)
    if part is not None:
        part.flush()
        del part
    head_parts = _gather_to_rank0(head)
    vdist.barrier()  # every part is on disk
    if config.format == "npz":
        error = None
        if info.is_rank0:
            try:
                merge_parts(out, config.n, config.batch_size, info.world_size)
            except (OSError, ValueError) as err:
                error = f"merging the parts into {out / NPZ_NAME} failed: {err}"
        error = _from_rank0(error)
        if error:
            from core.training.cli import JobFailed

            raise JobFailed(error, 1)  # on every rank (one line, exit 1): none waits for a peer that has stopped
    if info.is_rank0:
        if config.grid:
            _write_grid_and_strip(model, config, info.device, out, head_parts)
        what = "one PNG each" if config.format == "png" else f"one file {NPZ_NAME}, arr_0 uint8 NHWC"
        print(f"wrote {config.n} samples ({what}) to {out} in {time.perf_counter() - t0:.1f} s on "
              f"{info.world_size} rank(s), seed={config.seed} batch_size={config.batch_size}", flush=True)
    vdist.barrier()
    return out


def write_png(image, path: Path) -> None:
    """One uint8 (C, H, W) image as an 8-bit PNG: grayscale for C=1, RGB for 3, RGBA for 4 (Pillow's encoder)."""
    from PIL import Image

    hwc = image.transpose(1, 2, 0)
    Image.fromarray(hwc[..., 0] if hwc.shape[2] == 1 else hwc).save(path)


def merge_parts(out: Path, n: int, batch_size: int, world_size: int) -> Path:
    """Stream the per-rank parts into `<out>/samples.npz` (arr_0, uint8 (n, H, W, C), index order) and remove them.

    Written as numpy's own savez layout (a zip holding arr_0.npy) block by block, so rank 0 never holds all n images;
    a temporary name and a rename: a killed merge never leaves a truncated samples.npz.
    """
    import zipfile

    import numpy as np

    parts = {}
    for r in range(min(world_size, -(-n // batch_size))):  # ranks beyond the block count drew nothing
        path = part_path(out, r)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: format=npz merges every rank's part on rank 0, so `out` "
                                    "must be a directory all ranks share (on several nodes: a shared file system)")
        parts[r] = np.load(path, mmap_mode="r")
    shape = (n, *parts[0].shape[1:])
    final = out / NPZ_NAME
    tmp = out / f".{NPZ_NAME}.tmp"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": shape})
            for block in sample_blocks(n, batch_size):
                j = block.index // world_size  # its place among its rank's blocks (all earlier ones are full)
                f.write(np.ascontiguousarray(parts[block.index % world_size][j * batch_size:
                                                                            j * batch_size + len(block)]).data)
    tmp.replace(final)
    del parts
    for path in out.glob("samples.rank*.part.npy"):  # also parts a crashed run with more ranks left behind
        path.unlink()
    return final


def _from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a pickled broadcast); `obj` itself without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_shared_dir(out: Path, rank: int, world_size: int) -> None:
    """format=npz: rank 0 must see every rank's part in `out`; each rank leaves a marker file there and rank 0 looks
    for all of them, so a per-node directory fails at the start with the reason, on every rank."""
    import torch.distributed as dist

    if world_size == 1:
        return
    marker = out / f".samples.rank{rank}.check"
    marker.write_text(str(rank))
    dist.barrier()
    error = None
    if rank == 0:
        missing = [r for r in range(world_size) if not (out / f".samples.rank{r}.check").is_file()]
        if missing:
            error = (f"format=npz: rank 0 cannot see the files of rank(s) {missing} in {out}; the parts are merged on "
                     "rank 0, so `out` must be a directory all ranks share (on several nodes: a shared file system)")
    error = _from_rank0(error)
    marker.unlink(missing_ok=True)
    if error:
        raise ConfigError(error)  # on every rank: one line, exit 2


def _gather_to_rank0(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (empty elsewhere); [obj] without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(obj, parts if dist.get_rank() == 0 else None, dst=0)
    return parts


def _write_grid_and_strip(model, config: SampleConfig, device: torch.device, out: Path,
                          head_parts: list[dict]) -> None:
    """grid.png: images 0..63 (gathered from the ranks that drew them); chains.png: 8 chains' snapshots."""
    from core.visuals import save_grid

    head = {i: img for part in head_parts for i, img in part.items()}
    first = torch.stack([torch.from_numpy(head[i]) for i in sorted(head)]).float() / 127.5 - 1
    save_grid(first, out / "grid.png", nrow=8)
    from core.seeding import derive_seed

    gen = torch.Generator(device=device).manual_seed(derive_seed(config.seed, CHAIN_STRIP_KEY, 1))
    strip = model.sample(min(8, config.n), gen, config.options(strip_frames=8))
    if strip.frames:
        save_grid(torch.stack(strip.frames, 1).flatten(0, 1), out / "chains.png", nrow=len(strip.frames))


def describe_sampling(config: SampleConfig, resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)
