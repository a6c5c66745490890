"""What the asv benchmarks share: the workload definitions and the thread count.

asv benchmarks the suite of the working tree against optparity as installed at each commit, and
commits older than optparity.bench have no optparity.bench.workloads. So the module is loaded
from this tree by path, and only its optimizer classes come from the installed optparity.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_WORKLOADS_PY = Path(__file__).resolve().parents[2] / "impl" / "optparity" / "bench" / "workloads.py"


def _load_workloads():
    if not _WORKLOADS_PY.is_file():  # suite copied away from its tree: use the installed one
        from optparity.bench import workloads
        return workloads
    name = "_optparity_bench_workloads"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _WORKLOADS_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


workloads = _load_workloads()


def _threads() -> list[int]:
    text = os.environ.get("OPTPARITY_BENCH_THREADS", "1")
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"OPTPARITY_BENCH_THREADS={text!r}: expected positive integers, e.g. 1 or 1,2")
    return values


# torch.set_num_threads for every CPU benchmark; an asv parameter, so it is recorded with each
# result and runs with different thread counts never get compared with each other.
THREADS = _threads()


# Step temporaries are reused rather than page-faulted in again on every step, so a step's time
# does not depend on what this process ran before (see workloads.steady_allocator; without it
# the same step measures up to 2x apart). OPTPARITY_BENCH_SYSTEM_MALLOC=1 keeps glibc's defaults.
ALLOCATOR = ("system default" if os.environ.get("OPTPARITY_BENCH_SYSTEM_MALLOC") == "1"
             else workloads.steady_allocator())
