"""Rank-side code of the distributed asv benchmarks (suites/benchmarks/bench_distributed.py).

Each function runs on every rank of an optparity.harness.ranks.RankPool as fn(rank, world_size,
...). Every rank builds the same parameters and gradients (one seed), as after DDP's all-reduce.
"""
from __future__ import annotations

import gc
import importlib

import torch

from optparity.bench.workloads import WORKLOADS, make_params, state_bytes

_LIVE: dict = {}  # this rank's optimizer under test, kept between calls


def missing(impl: str, names: list[str]) -> str | None:
    """Why `names` cannot be benchmarked for `impl` ('optparity' or 'torch'), or None."""
    if impl not in ("optparity", "torch"):
        return f"unknown implementation {impl!r}; expected optparity or torch"
    if impl == "torch":
        return None
    try:
        module = importlib.import_module("optparity.distributed")
        for name in names:
            getattr(module, name)
    except (ImportError, AttributeError) as e:
        return f"optparity.distributed has no usable {', '.join(names)} yet ({type(e).__name__}: {e})"
    return None


def _optimizer_class(impl: str, algorithm: str) -> type:
    return getattr(importlib.import_module("torch.optim" if impl == "torch" else "optparity.optim"), algorithm)


def _params(workload: str) -> list[torch.Tensor]:
    return make_params(WORKLOADS[workload], torch.float32)


def build_zero(rank: int, world_size: int, impl: str, algorithm: str = "Adam", workload: str = "transformer") -> int:
    """A ZeroRedundancyOptimizer over the workload (inner optimizer from the same library), two
    warm-up steps; returns this rank's optimizer-state bytes (its shard)."""
    release(rank, world_size)
    if impl == "torch":
        from torch.distributed.optim import ZeroRedundancyOptimizer
    else:
        from optparity.distributed import ZeroRedundancyOptimizer
    opt = ZeroRedundancyOptimizer(_params(workload), optimizer_class=_optimizer_class(impl, algorithm))
    for _ in range(2):
        opt.step()
    _LIVE["opt"] = opt
    return state_bytes(getattr(opt, "optim", opt))  # .optim: the local optimizer over this rank's shard


def build_post_local_sgd(rank: int, world_size: int, impl: str, mode: str, period: int,
                         workload: str = "transformer") -> None:
    """SGD with momentum, plain ('local') or wrapped in PostLocalSGDOptimizer averaging every
    `period` steps ('post_local_sgd'); warmed up for one full period."""
    release(rank, world_size)
    sgd = _optimizer_class(impl, "SGD")(_params(workload), lr=0.01, momentum=0.9)
    if mode == "local":
        opt = sgd
    elif mode == "post_local_sgd":
        if impl == "torch":
            from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
            from torch.distributed.optim import PostLocalSGDOptimizer
        else:
            from optparity.distributed import PeriodicModelAverager, PostLocalSGDOptimizer
        opt = PostLocalSGDOptimizer(sgd, PeriodicModelAverager(period=period, warmup_steps=0))
    else:
        raise ValueError(f"unknown mode {mode!r}; expected local or post_local_sgd")
    for _ in range(period):
        opt.step()
    _LIVE["opt"] = opt


def step(rank: int, world_size: int, n: int = 1) -> None:
    opt = _LIVE.get("opt")
    if opt is None:
        raise RuntimeError("nothing built on this rank: call build_zero or build_post_local_sgd first")
    for _ in range(n):
        opt.step()


def noop(rank: int, world_size: int) -> None:
    """The pool's dispatch round trip, to read step latencies against."""


def release(rank: int, world_size: int) -> None:
    _LIVE.clear()
    gc.collect()
