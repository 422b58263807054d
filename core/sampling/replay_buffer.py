"""Cross-rank replay buffer of ε_z for persistent VAEBM chains (vaebm.md App. E; DESIGN.md "Replay buffer").

Only ε_z is stored (ε_x always restarts from N(0, I), App. E). The total capacity C (10k for CIFAR-10 / LSUN Church,
8k for CelebA-HQ 256) is split into one preallocated shard of ceil(C/R) rows per rank, kept in a low-precision
dtype (bf16 by default) on a configurable device. Every rank pushes its own final chains into its own shard (ring
buffer, no communication). Replay is global: a replayed chain is a uniform draw over every filled row of every
shard, as if the R shards were one buffer, so a rank may continue a chain another rank produced.

Exchange (`ReplayBuffer.sample`, collective; gloo and NCCL):
  1. all_gather of [fill_r, k_r] (2 int64 per rank): every rank learns the global fill and how many rows each
     rank requests;
  2. each rank draws its k_r global row indices uniformly in [0, Σ fill) with its own generator, and all_gather
     of the requests padded to the fixed per-rank batch n (n int64 per rank);
  3. every rank gathers, for each requester, the requested rows it owns, and one all_to_all_single with uneven
     splits delivers exactly those rows (sent as raw bytes, so bf16 travels bit-exactly on any backend).
Cost per call: three collectives (latency-bound for small batches); index traffic R·n·8 bytes received per rank;
payload exactly the requested rows, k_r·D·itemsize bytes received by rank r (D = Σ_l numel(ε_z,l)) and on average
Σ_q k_q/R rows sent, i.e. no padding and no replication of data (an all_gather of padded blocks would move R·n·D
per rank instead). Storage: ceil(C/R)·D·itemsize bytes per rank; with storage on CPU and NCCL the served rows are
staged through the GPU (one host-device copy of the rows each way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


@dataclass
class ReplayBufferConfig:
    capacity: int = 10000  # total rows over all ranks (vaebm.md App. E: 10,000 CIFAR-10/LSUN Church, 8,000 CelebA-HQ)
    storage_dtype: str = "bfloat16"  # dtype of stored ε_z: bfloat16 / float16 / float32 (chains restart in fp32)
    device: str = "cpu"  # where the shard lives: "cpu" (saves GPU memory) or "cuda" (no host copies on replay)
    max_p: float = 0.6  # final probability of starting a chain from the buffer (App. E)
    anneal_iterations: int = 5000  # iterations of the linear 0 -> max_p ramp (App. E: 5,000; 3,000 for CelebA-HQ)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("ReplayBufferConfig.capacity must be >= 1")
        if self.storage_dtype not in _DTYPES:
            raise ValueError(f"ReplayBufferConfig.storage_dtype must be one of {sorted(_DTYPES)}")
        if not 0.0 <= self.max_p <= 1.0 or self.anneal_iterations < 0:
            raise ValueError("ReplayBufferConfig: need 0 <= max_p <= 1 and anneal_iterations >= 0")


def replay_probability(iteration: int, max_p: float = 0.6, anneal_iterations: int = 5000) -> float:
    """p of App. E: linear from 0 at iteration 0 to `max_p` at `anneal_iterations`, constant afterwards."""
    if anneal_iterations <= 0:
        return max_p
    return max_p * min(1.0, max(0, iteration) / anneal_iterations)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ReplayBuffer:
    """This rank's shard of the global ε_z buffer; `sample` and `init_chains` are collective over all ranks."""

    def __init__(self, latent_shapes: list[tuple[int, ...]], config: ReplayBufferConfig):
        # Rank and world size come from the default process group (a world of one without it); build the buffer
        # after `core.dist.init_distributed`.
        self.rank, self.world_size = _world()
        self.config = config
        self.latent_shapes = [tuple(s) for s in latent_shapes]
        self.numels = [math.prod(s) for s in self.latent_shapes]
        self.shard_capacity = math.ceil(config.capacity / self.world_size)
        self.dtype = _DTYPES[config.storage_dtype]
        self.device = torch.device(config.device)
        # One (rows, D) matrix for all groups: a replayed row is one gather and one contiguous message.
        self.data = torch.zeros(self.shard_capacity, sum(self.numels), dtype=self.dtype, device=self.device)
        self.size = 0  # filled rows of this shard; rows [0, size) are valid (the ring only wraps once full)
        self.pos = 0  # next row to write
        self.dropped_nonfinite = 0  # pushed rows refused because they held NaN/Inf (a bad chain never replays)

    # ---------------------------------------------------------------- local
    def _flatten(self, eps_z: list[torch.Tensor]) -> torch.Tensor:
        if [tuple(e.shape[1:]) for e in eps_z] != self.latent_shapes:
            raise ValueError(f"eps_z shapes {[tuple(e.shape[1:]) for e in eps_z]} != buffer's {self.latent_shapes}")
        return torch.cat([e.detach().reshape(e.shape[0], -1).float() for e in eps_z], dim=1)

    def _unflatten(self, rows: torch.Tensor) -> list[torch.Tensor]:
        parts = rows.float().split(self.numels, dim=1)
        return [p.reshape(rows.shape[0], *s) for p, s in zip(parts, self.latent_shapes)]

    def push(self, eps_z: list[torch.Tensor]) -> int:
        """Append this rank's final chains (ring buffer, oldest overwritten); returns the number of rows stored.

        Local, no communication. Rows with non-finite values are dropped and counted in `dropped_nonfinite`.
        """
        rows = self._flatten(eps_z)
        ok = torch.isfinite(rows).all(dim=1)
        self.dropped_nonfinite += int((~ok).sum())
        rows = rows[ok][-self.shard_capacity:].to(device=self.device, dtype=self.dtype)
        m = rows.shape[0]
        idx = (self.pos + torch.arange(m, device=self.device)) % self.shard_capacity
        self.data[idx] = rows
        self.pos = (self.pos + m) % self.shard_capacity
        self.size = min(self.size + m, self.shard_capacity)
        return m

    def __len__(self) -> int:
        return self.size

    # ---------------------------------------------------------------- collective
    def _comm_device(self) -> torch.device:
        """NCCL only moves CUDA tensors; gloo is used with CPU tensors."""
        if self.world_size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return torch.stack(out)

    def _fill_counts(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fill of every shard, rows requested by every rank), both (R,) int64 on CPU."""
        mine = torch.tensor([self.size, k], dtype=torch.int64)
        if self.world_size == 1:
            return mine[:1], mine[1:]
        both = self._all_gather(mine.to(self._comm_device())).cpu()
        return both[:, 0], both[:, 1]

    def _fetch(self, global_idx: torch.Tensor, n: int, fills: torch.Tensor, wants: torch.Tensor) -> torch.Tensor:
        """Rows at this rank's global indices (k,) from whichever shards own them; collective (see module doc)."""
        starts = torch.cumsum(fills, 0) - fills  # global row g of rank r's shard: starts[r] <= g < starts[r]+fill
        if self.world_size == 1:
            return self.data[global_idx.to(self.device)]
        comm = self._comm_device()
        padded = torch.full((n,), -1, dtype=torch.int64)
        padded[: global_idx.numel()] = global_idx
        requests = self._all_gather(padded.to(comm)).cpu()  # (R, n), row q = requests of rank q
        # Serve: for requester q, the rows I own, in q's request order.
        serve, send_splits = [], []
        for q in range(self.world_size):
            req = requests[q, : int(wants[q])]
            owner = torch.searchsorted(torch.cumsum(fills, 0), req, right=True)
            local = req[owner == self.rank] - starts[self.rank]
            serve.append(local)
            send_splits.append(local.numel())
        send = self.data[torch.cat(serve).to(self.device)].to(comm)
        mine = requests[self.rank, : int(wants[self.rank])]
        my_owner = torch.searchsorted(torch.cumsum(fills, 0), mine, right=True)
        recv_splits = [int((my_owner == r).sum()) for r in range(self.world_size)]
        # Raw bytes: bit-exact for any storage dtype, and independent of the backend's dtype support.
        row_bytes = self.data.shape[1] * self.data.element_size()
        recv = torch.empty(sum(recv_splits), row_bytes, dtype=torch.uint8, device=comm)
        dist.all_to_all_single(recv, send.contiguous().view(torch.uint8).reshape(-1, row_bytes),
                               output_split_sizes=recv_splits, input_split_sizes=send_splits)
        recv = recv.view(self.dtype).reshape(-1, self.data.shape[1])
        # recv is grouped by owner rank, each group in my request order: undo the grouping.
        order = torch.argsort(my_owner, stable=True)
        out = torch.empty_like(recv)
        out[order.to(recv.device)] = recv
        return out

    def sample(self, k: int, n: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """k rows drawn uniformly (with replacement) over the filled rows of ALL shards, as fp32 ε_z groups.

        Collective: every rank calls it with the same per-rank maximum `n` (k <= n may differ per rank). Raises if
        the whole buffer is empty. Indices are drawn with `generator` (CPU), so results are deterministic per rank.
        """
        if not 0 <= k <= n:
            raise ValueError(f"ReplayBuffer.sample: need 0 <= k <= n, got k={k}, n={n}")
        fills, wants = self._fill_counts(k)
        total = int(fills.sum())
        if total == 0:
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty on every rank")
        idx = torch.randint(total, (k,), generator=generator, dtype=torch.int64)
        return self._unflatten(self._fetch(idx, n, fills, wants))

    def init_chains(self, n: int, p: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Initial ε_z of n chains: each from the global buffer with probability p, else fresh N(0, I) (App. E).

        Collective: all ranks call it with the same n and p. Returns (eps_z as fp32 tensors on `device`, (n,) bool
        mask of replayed chains). Nothing is replayed while the whole buffer is empty. `generator` must be a CPU
        generator (e.g. `rank_generator(seed, rank, step)`); it draws the coin flips, the indices and the noise.
        """
        device = torch.device(device) if device is not None else self.device
        coins = torch.rand(n, generator=generator) < p
        fresh = [torch.randn((n, *s), generator=generator) for s in self.latent_shapes]
        if p <= 0.0:  # same p on every rank, so every rank skips the collectives together
            return [f.to(device) for f in fresh], torch.zeros(n, dtype=torch.bool, device=device)
        fills, wants = self._fill_counts(int(coins.sum()))
        total = int(fills.sum())
        if total == 0:
            return [f.to(device) for f in fresh], torch.zeros(n, dtype=torch.bool, device=device)
        idx = torch.randint(total, (int(coins.sum()),), generator=generator, dtype=torch.int64)
        replayed = self._unflatten(self._fetch(idx, n, fills, wants))
        out = []
        for f, r in zip(fresh, replayed):
            f[coins] = r.to(f.device)
            out.append(f.to(device))
        return out, coins.to(device)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """This rank's shard: fill, write position and the filled rows (CPU, storage dtype: bit-exact resume)."""
        return {"size": self.size, "pos": self.pos, "dropped_nonfinite": self.dropped_nonfinite,
                "shard_capacity": self.shard_capacity, "world_size": self.world_size,
                "latent_shapes": [list(s) for s in self.latent_shapes],
                "data": self.data[: self.size].cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a shard written by `state_dict` of the same rank in a run with the same capacity and world size."""
        shapes = [tuple(s) for s in state["latent_shapes"]]
        saved = (int(state["shard_capacity"]), int(state["world_size"]), shapes)
        if saved != (self.shard_capacity, self.world_size, self.latent_shapes):
            raise ValueError(f"replay buffer checkpoint has (shard capacity, world size, latent shapes) = {saved}; "
                             f"this run has {(self.shard_capacity, self.world_size, self.latent_shapes)} "
                             "(capacity, world size and backbone must match the run that wrote it)")
        data = state["data"]
        if data.dtype != self.dtype:
            raise ValueError(f"replay buffer checkpoint stores {data.dtype}, this run stores {self.dtype}")
        self.data.zero_()
        self.data[: data.shape[0]] = data.to(self.device)
        self.size, self.pos = int(state["size"]), int(state["pos"])
        self.dropped_nonfinite = int(state.get("dropped_nonfinite", 0))
