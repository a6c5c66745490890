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

_BENCH_DIR = Path(__file__).resolve().parents[2] / "impl" / "optparity" / "bench"


def _load(module_name: str):
    """optparity/bench/<module_name>.py of this tree (torch + stdlib only), or the installed one
    when the suite was copied away from its tree."""
    path = _BENCH_DIR / f"{module_name}.py"
    if not path.is_file():
        return importlib.import_module(f"optparity.bench.{module_name}")
    name = f"_optparity_bench_{module_name}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


workloads = _load("workloads")
blocks = _load("blocks")  # interleaved block timing: the normalised figures (StepRatio)


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
