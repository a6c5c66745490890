"""Distributed optimizers on Gloo: ZeRO per-rank state and step latency, post-local-SGD overhead.

Ranks are spawned processes (optparity.harness.ranks.RankPool, one torch thread each) that this
asv process drives; a timed call dispatches the step to every rank and returns when all are done,
so it includes the pool's round trip, which time_roundtrip measures on its own. Starting ranks
takes seconds and asv re-runs setup() before every sample, so each asv process starts its pool and
builds its optimizers once, and keeps them until it exits.

Benchmarks of an optparity class that does not exist (yet, or at an older commit) are skipped.
"""
from __future__ import annotations

import atexit

_POOLS: dict = {}   # world_size -> RankPool
_BUILT: dict = {}   # world_size -> (what is built on that pool, its build() return values)


def _require(impl: str, names: list[str]):
    """The rank-side module, or NotImplementedError (asv: skipped) naming what is missing."""
    try:
        from optparity.bench import distributed as rank_side
        from optparity.harness.ranks import RankPool  # noqa: F401
    except ImportError as e:
        raise NotImplementedError(f"this optparity cannot run the distributed benchmarks: {e}") from None
    reason = rank_side.missing(impl, names)
    if reason:
        raise NotImplementedError(reason)
    return rank_side


def _pool(world_size: int):
    from optparity.harness.ranks import RankPool

    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size, "gloo", timeout=300)
        _BUILT.pop(world_size, None)
    return pool


def _build(world_size: int, fn, *args):
    """Run fn(*args) on every rank unless that exact build is what the pool already holds."""
    pool = _pool(world_size)
    key = (fn.__name__, args)
    if _BUILT.get(world_size, (None,))[0] != key:
        _BUILT[world_size] = (key, pool.run(fn, *args))
    return pool, _BUILT[world_size][1]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


class ZeroStep:
    """ZeroRedundancyOptimizer(Adam) over the transformer workload, float32."""

    params = [["optparity", "torch"], [1, 2, 4]]
    param_names = ["impl", "world_size"]
    timeout = 600

    def setup(self, impl, world_size):
        rank_side = _require(impl, ["ZeroRedundancyOptimizer"])
        self.rank_side = rank_side
        self.pool, self.per_rank_state = _build(world_size, rank_side.build_zero, impl, "Adam", "transformer")

    def time_step(self, impl, world_size):
        self.pool.run(self.rank_side.step, 1)

    def time_roundtrip(self, impl, world_size):
        self.pool.run(self.rank_side.noop)

    def track_state_bytes_per_rank(self, impl, world_size):
        return max(self.per_rank_state)  # the largest shard bounds the memory a rank needs

    track_state_bytes_per_rank.unit = "bytes"


class PostLocalSGD:
    """SGD(momentum) over the transformer workload: plain local steps vs PostLocalSGDOptimizer with
    a PeriodicModelAverager. One timed call is PERIOD steps, i.e. exactly one averaging, so the
    overhead is time_period(post_local_sgd) / time_period(local)."""

    PERIOD = 4
    params = [["optparity", "torch"], ["local", "post_local_sgd"], [2, 4]]
    param_names = ["impl", "mode", "world_size"]
    timeout = 600

    def setup(self, impl, mode, world_size):
        needs = ["PostLocalSGDOptimizer", "PeriodicModelAverager"] if mode == "post_local_sgd" else []
        self.rank_side = _require(impl, needs)
        self.pool, _ = _build(world_size, self.rank_side.build_post_local_sgd, impl, mode, self.PERIOD)

    def time_period(self, impl, mode, world_size):
        self.pool.run(self.rank_side.step, self.PERIOD)
