"""Process-group setup, per-rank seeding and the few collectives the trainers need.

Works the same under the `deepspeed` launcher, `torchrun` and plain `python` (one rank): the launchers export
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them this process becomes a world of one.
"""
from __future__ import annotations

import datetime
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from core.seeding import derive_seed  # noqa: F401  (re-exported: callers use core.dist.derive_seed)


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank
    world_size: int  # number of ranks
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # cuda:<local_rank> when GPUs are present, else cpu

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unlink_shm_allreduce_buffer() -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer once every rank has mapped it.

    DeepSpeed never unlinks these (~65 MB per rank in /dev/shm), so every restart of a CPU job on the same host leaked
    one per rank until the tmpfs filled. After the barrier all local ranks hold their mappings, which outlive the name.
    """
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when run without a launcher); valid before init."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group (NCCL on GPUs, gloo on CPUs) with a collective timeout.

    The timeout bounds how long survivors wait on a dead peer: a killed rank makes the whole job exit instead of hang.
    """
    if "WORLD_SIZE" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))  # for libraries that read it; the group below needs no port
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized() and int(os.environ["WORLD_SIZE"]) == 1:
        # A world of one needs no collectives: torch's group directly, without DeepSpeed's communication layer,
        # whose CPU shared-memory op is JIT-built on first use (~50 s on 2 idle cores). deepspeed.initialize, if a
        # training stage calls it later, adopts this group. Its store lives in memory: a TCP store would listen on a
        # port picked earlier, which another process may take in between (EADDRINUSE on a busy machine).
        dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
    elif not dist.is_initialized():
        import deepspeed  # deferred: importing deepspeed probes accelerators, which costs seconds

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
        if backend == "gloo":
            _unlink_shm_allreduce_buffer()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def seed_everything(seed: int, rank: int, step: int, *more: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and Python `random` from (seed, rank, step, *more) (`more`: e.g. the
    gradient-accumulation pass after the first).

    Reseeding every step makes a resumed run draw exactly the noise an uninterrupted one would, and distinct ranks
    never draw identical noise (DESIGN.md "Per-rank randomness").
    """
    s = derive_seed(seed, rank, step, *more)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def rng_state() -> dict:
    """Every RNG stream of this process, for checkpoints, as tensors, ints and lists only: the file it goes into is
    read back with `torch.load(weights_only=True)`, which refuses numpy objects (and any pickled code)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place and returned); identity in a world of one or without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True only if `flag` holds on every rank: ranks take the same branch, so collectives cannot deadlock."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_reduce_sum(t).item() == 0.0


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
