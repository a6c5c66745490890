"""Shared ranks for the distributed suites: one process group per world size, reused by every
test (spawning per assertion would take hours on two cores). Under torchrun the ranks are the
torchrun processes themselves and only the tests for its world size run."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from optparity.harness.ranks import InProcessRanks, RankPool, under_torchrun

WORLD_SIZES = (1, 2, 3, 4)


def backend_skip_reason(backend: str) -> str | None:
    if backend == "nccl":
        if not torch.cuda.is_available():
            return "NCCL needs CUDA; this machine has no GPU"
        if not dist.is_nccl_available():
            return "this torch build has no NCCL"
    if under_torchrun() and backend != dist.get_backend():
        return f"this torchrun job uses {dist.get_backend()}"
    return None


@pytest.fixture(scope="session")
def ranks():
    """ranks(world_size, backend="gloo") -> a pool with .run(fn, *args) returning per-rank results."""
    pools: dict[tuple[int, str], RankPool] = {}
    local = {}

    def get(world_size: int, backend: str = "gloo"):
        if under_torchrun() and "job" not in local:
            local["job"] = InProcessRanks()  # joins torchrun's group; the skip check below needs it
        reason = backend_skip_reason(backend) if backend != "gloo" or under_torchrun() else None
        sizes = _wanted_world_sizes()
        if sizes and world_size not in sizes:
            reason = f"world size {world_size}: OPTPARITY_WORLD_SIZES={os.environ['OPTPARITY_WORLD_SIZES']}"
        if reason:
            pytest.skip(reason)
        if under_torchrun():
            if world_size != local["job"].world_size:
                pytest.skip(f"this torchrun job has world size {local['job'].world_size}, the test needs {world_size}")
            return local["job"]
        pool = pools.get((world_size, backend))
        if pool is None or not pool.alive:
            pool = pools[(world_size, backend)] = RankPool(world_size, backend)
        return pool

    yield get
    for pool in pools.values():
        pool.close()


def _params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {})


def _is_nccl(item) -> bool:
    return _params(item).get("backend") == "nccl" or item.originalname.endswith("_nccl")


def _world_size(item) -> int | None:
    """The world size a parametrized test asks for (its parameter's name varies), else None."""
    params = _params(item)
    return next((params[k] for k in ("world_size", "ws", "n") if isinstance(params.get(k), int)), None)


def _wanted_world_sizes() -> set[int] | None:
    """OPTPARITY_WORLD_SIZES=1 (or 1,2): run only those world sizes (the GPU check: one GPU)."""
    wanted = os.environ.get("OPTPARITY_WORLD_SIZES")
    return {int(w) for w in wanted.split(",") if w.strip()} if wanted else None


def pytest_collection_modifyitems(config, items):
    # Under torchrun every rank runs pytest; collection order must be identical on all ranks.
    if under_torchrun() and os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError("run the distributed suite under torchrun without pytest-xdist (-n)")
    for item in items:  # -m nccl / -m cuda select the NCCL variants (scripts/gpu-check.sh)
        if _is_nccl(item):
            item.add_marker(pytest.mark.nccl)
            item.add_marker(pytest.mark.cuda)
    # tests parametrized by other world sizes are deselected; others skip in the fixture
    sizes = _wanted_world_sizes()
    if sizes:
        deselected = [i for i in items if _world_size(i) is not None and _world_size(i) not in sizes]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [i for i in items if i not in deselected]
