"""Injected faults end a run fast, naming the rank, and leave no orphan processes."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from optparity.harness.ranks import RankError, RankPool, under_torchrun

pytestmark = pytest.mark.skipif(under_torchrun(), reason="fault injection spawns its own ranks; not under torchrun")

# Liveness bound, not a speed target: a fault must never turn into a hung CI job.
DEADLINE_S = 55


def _all_reduce_sum(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _raise_on(rank, world_size, bad_rank):
    if rank == bad_rank:
        raise ValueError(f"planted failure on rank {rank}")
    dist.barrier()


def _die_on(rank, world_size, bad_rank):
    if rank == bad_rank:
        os._exit(7)
    dist.barrier()


def _hang_on(rank, world_size, bad_rank):
    if rank == bad_rank:
        time.sleep(3600)
    t = torch.ones(1)
    dist.all_reduce(t)


@pytest.fixture
def fresh_pool():
    pools = []

    def make(world_size=3):
        pool = RankPool(world_size, timeout=40, collective_timeout=8)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close()
    assert not multiprocessing.active_children(), "orphan rank processes left behind"


@pytest.mark.parametrize("fault,fn,expected", [
    ("raise", _raise_on, "rank 2 raised while running"),
    ("die", _die_on, "rank 2 died (exit code 7)"),
    ("hang", _hang_on, "rank 2 hung in"),
])
def test_fault_names_the_rank(fresh_pool, fault, fn, expected):
    pool = fresh_pool()
    assert pool.run(_all_reduce_sum) == [6.0, 6.0, 6.0]
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        pool.run(fn, 2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert expected in message and fn.__name__ in message, message
    if fault == "raise":
        assert "ValueError: planted failure on rank 2" in message
    if fault == "hang":
        assert "timed out" in message.lower() and "_hang_on" in message  # the collective and where it was
    assert elapsed < DEADLINE_S, f"{fault} took {elapsed:.0f} s to surface"
    assert not pool.alive
    assert not [p for p in multiprocessing.active_children() if p.is_alive() and p.pid in {q.pid for q in pool._procs}]
    with pytest.raises(RankError, match="pool is closed"):
        pool.run(_all_reduce_sum)


def test_pool_recovers_with_a_new_group(fresh_pool):
    with pytest.raises(RankError):
        fresh_pool(2).run(_raise_on, 0)
    assert fresh_pool(2).run(_all_reduce_sum) == [3.0, 3.0]


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size must be at least 1"):
        RankPool(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_nccl_without_gpu_is_refused_clearly():
    with pytest.raises(RankError, match="NCCL needs CUDA"):
        RankPool(2, backend="nccl")
