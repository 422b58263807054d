"""Replay buffer of ε_z (vaebm.md App. E): ring shards, the p schedule, checkpoints, and global sampling over two
real gloo ranks (torch.multiprocessing + file:// rendezvous)."""
from __future__ import annotations

import io
import os

import pytest
import scipy.stats
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.sampling import (LangevinConfig, ReplayBuffer, ReplayBufferConfig, rank_generator, replay_probability,
                           run_langevin)

SHAPES = [(2,), (1, 3)]  # two latent groups: D = 2 + 3


def _rows(tags: list[float]) -> list[torch.Tensor]:
    """ε_z whose every entry of sample i equals tags[i] (small integers: exact in bf16)."""
    t = torch.tensor(tags, dtype=torch.float32)
    return [t.view(-1, 1).expand(-1, 2).clone(), t.view(-1, 1, 1).expand(-1, 1, 3).clone()]


def _tags(eps_z: list[torch.Tensor]) -> torch.Tensor:
    flat = torch.cat([e.reshape(e.shape[0], -1) for e in eps_z], 1)
    assert torch.equal(flat, flat[:, :1].expand_as(flat)), "a row was torn apart or mixed with another"
    return flat[:, 0]


def test_replay_probability_schedule():
    assert replay_probability(0) == 0.0
    assert replay_probability(2500) == pytest.approx(0.3)
    assert replay_probability(5000) == pytest.approx(0.6) and replay_probability(10**6) == pytest.approx(0.6)
    assert replay_probability(1000, anneal_iterations=3000) == pytest.approx(0.2)  # CelebA-HQ 256
    assert replay_probability(3000, anneal_iterations=3000) == pytest.approx(0.6)
    assert replay_probability(10, max_p=0.95, anneal_iterations=0) == 0.95


def test_ring_push_capacity_dtype_and_nonfinite_rows():
    buf = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=5))
    assert buf.data.dtype == torch.bfloat16 and buf.data.shape == (5, 5)
    assert buf.push(_rows([1, 2, 3])) == 3 and len(buf) == 3
    assert buf.push(_rows([4, 5, 6, float("nan")])) == 3 and buf.dropped_nonfinite == 1
    assert len(buf) == 5 and buf.pos == 1
    assert _tags(buf._unflatten(buf.data)).tolist() == [6, 2, 3, 4, 5]  # oldest (1) overwritten
    buf.push(_rows(list(range(10, 22))))  # more than a shard: only the newest rows are kept
    assert sorted(_tags(buf._unflatten(buf.data)).tolist()) == [17, 18, 19, 20, 21]
    eps, mask = buf.init_chains(64, p=1.0, generator=torch.Generator().manual_seed(0))
    assert mask.all() and all(e.dtype == torch.float32 for e in eps)
    assert set(_tags(eps).tolist()) <= {17.0, 18.0, 19.0, 20.0, 21.0}
    assert ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=5, storage_dtype="float32")).data.dtype == torch.float32


def test_empty_buffer_or_zero_p_gives_fresh_gaussian_chains():
    buf = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=8))
    eps, mask = buf.init_chains(4000, p=0.6, generator=torch.Generator().manual_seed(0))
    assert not mask.any() and [tuple(e.shape) for e in eps] == [(4000, 2), (4000, 1, 3)]
    flat = torch.cat([e.reshape(4000, -1) for e in eps], 1)
    assert flat.mean().abs() < 0.03 and (flat.std() - 1).abs() < 0.03
    buf.push(_rows([100, 101]))
    eps, mask = buf.init_chains(4000, p=0.6, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.6) < 0.03
    tags = _tags([e[mask] for e in eps])
    assert set(tags.tolist()) == {100.0, 101.0}
    assert not torch.isin(eps[0][~mask][:, 0], torch.tensor([100.0, 101.0])).any()
    _, mask = buf.init_chains(100, p=0.0, generator=torch.Generator().manual_seed(0))
    assert not mask.any()


def test_checkpoint_round_trip_is_bit_identical():
    buf = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=6))
    buf.push([torch.randn(4, 2), torch.randn(4, 1, 3)])
    buf.push([torch.randn(3, 2), torch.randn(3, 1, 3)])  # wrapped: pos != size
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=6))
    restored.load_state_dict(torch.load(blob))
    assert (restored.size, restored.pos) == (buf.size, buf.pos) and torch.equal(restored.data, buf.data)
    a, ma = buf.init_chains(32, 0.5, torch.Generator().manual_seed(9))
    b, mb = restored.init_chains(32, 0.5, torch.Generator().manual_seed(9))
    assert torch.equal(ma, mb) and all(torch.equal(x, y) for x, y in zip(a, b))
    # Pushing after resume continues the ring at the same place.
    new = [torch.randn(2, 2), torch.randn(2, 1, 3)]
    buf.push(new), restored.push(new)
    assert torch.equal(restored.data, buf.data)
    with pytest.raises(ValueError):
        ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=7)).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError):
        ReplayBuffer([(5,)], ReplayBufferConfig(capacity=6)).load_state_dict(buf.state_dict())


# ------------------------------------------------------------------------------------------ two gloo ranks
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        _two_rank_checks(rank, out_dir)
    finally:
        dist.destroy_process_group()


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(2)]
    dist.all_gather(out, t)
    return out


def _two_rank_checks(rank: int, out_dir: str) -> None:
    # Shards: capacity 7 over 2 ranks -> 4 rows each; rank r pushes tags 10r+i (disjoint by construction).
    buf = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=7, storage_dtype="bfloat16"))
    assert buf.shard_capacity == 4 and buf.data.shape[0] == 4

    # Empty everywhere: no replay, and no rank hangs in a collective.
    eps, mask = buf.init_chains(8, 0.9, rank_generator(0, rank, 0))
    assert not mask.any()

    # Unequal fills: rank 0 holds 3 rows, rank 1 holds 4 (pushed 6, ring keeps the newest 4).
    pushed = [10 * rank + i for i in range(3 if rank == 0 else 6)]
    buf.push(_rows(pushed))
    own = set(_tags(buf._unflatten(buf.data[: len(buf)])).tolist())
    assert own == ({0, 1, 2} if rank == 0 else {12, 13, 14, 15})
    fills = _gather(torch.tensor([len(buf)]))
    assert [int(f) for f in fills] == [3, 4]
    everything = {0.0, 1.0, 2.0, 12.0, 13.0, 14.0, 15.0}

    # Global sampling, uneven request sizes (k = 4000 on rank 0, 2500 on rank 1, same n).
    k = 4000 if rank == 0 else 2500
    draws = _tags(buf.sample(k, 4000, rank_generator(1, rank, 0)))
    assert draws.shape == (k,) and set(draws.tolist()) == everything  # rows from both shards on every rank
    again = _tags(buf.sample(k, 4000, rank_generator(1, rank, 0)))
    assert torch.equal(draws, again)  # deterministic given the generator
    # Row i of the result is global row idx[i] of the concatenated shards (rank 0's rows first), where idx are
    # the generator's uniform draws: the exchange returns every row to the slot that asked for it.
    shard_tags = _gather(_tags(buf._unflatten(buf.data)))
    table = torch.cat([shard_tags[0][:3], shard_tags[1][:4]])
    idx = torch.randint(7, (k,), generator=rank_generator(1, rank, 0))
    assert torch.equal(draws, table[idx])
    padded = torch.full((4000,), -1.0)
    padded[:k] = draws
    all_draws = torch.cat([g[g >= 0] for g in _gather(padded)])
    counts = torch.stack([(all_draws == t).sum() for t in sorted(everything)]).double()
    p_value = scipy.stats.chisquare(counts.numpy()).pvalue  # H0: uniform over all 7 filled rows
    assert p_value > 1e-4, (counts, p_value)

    # init_chains: replayed rows are buffer rows, fresh ones are Gaussian, ranks draw different chains.
    eps, mask = buf.init_chains(256, 0.5, rank_generator(2, rank, 0))
    assert set(_tags([e[mask] for e in eps]).tolist()) <= everything and 90 < int(mask.sum()) < 166
    assert not torch.isin(eps[0][~mask][:, 0], torch.tensor(sorted(everything))).all()
    other = _gather(eps[1].reshape(256, -1).contiguous())[1 - rank]
    assert not torch.equal(other, eps[1].reshape(256, -1))

    # Checkpoint round trip per shard: a fresh buffer restored from state_dict replays identical chains.
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    restored = ReplayBuffer(SHAPES, ReplayBufferConfig(capacity=7, storage_dtype="bfloat16"))
    restored.load_state_dict(torch.load(blob))
    a, ma = buf.init_chains(64, 0.6, rank_generator(3, rank, 5))
    b, mb = restored.init_chains(64, 0.6, rank_generator(3, rank, 5))
    assert torch.equal(ma, mb) and all(torch.equal(x, y) for x, y in zip(a, b))

    # Per-rank Langevin noise: same seed and step, different rank -> different chains; same rank -> same chains.
    def run(r):
        init = [torch.zeros(16, 3)]
        return run_langevin(lambda s: 0.5 * s[0].pow(2).sum(1), init, LangevinConfig(num_steps=3, step_size=0.1),
                            rank_generator(11, r, 7, stream=1)).state[0]
    mine = run(rank)
    theirs = _gather(mine)[1 - rank]
    assert not torch.allclose(mine, theirs) and torch.equal(mine, run(rank))
    torch.save({"p_value": p_value}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.integration
def test_two_gloo_ranks_global_sampling_sharding_checkpoint_and_noise(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert all((tmp_path / f"rank{r}.pt").exists() for r in range(2))
