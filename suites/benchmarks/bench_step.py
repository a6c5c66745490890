"""Single-process optimizer steps: latency and memory, optparity vs torch on every path.

Matrix: algorithm x implementation (optparity forloop/foreach, torch forloop/foreach/fused) x
workload (1M, 16M, transformer) x dtype (float32, bfloat16). Combinations that do not exist
(torch has no fused Rprop) raise NotImplementedError in setup, which asv records as skipped.
"""
from __future__ import annotations

import functools

import torch

from .common import ALLOCATOR, THREADS, workloads as W

_PARAMS = [list(W.ALGORITHMS), list(W.IMPLS), list(W.WORKLOADS), list(W.DTYPES)]
_NAMES = ["algorithm", "impl", "workload", "dtype"]


@functools.lru_cache(maxsize=1)
def _ready(algorithm: str, impl: str, workload: str, dtype: str, device: str = "cpu"):
    # asv re-runs setup() before every timed call; rebuilding 16M-element tensors each time would
    # cost more than the step and measure the first step instead of a steady-state one. Each asv
    # process runs one parameter combination, so one cached optimizer is enough.
    return W.prepared(algorithm, impl, workload, dtype, device)


class StepTime:
    """Wall time of one optimizer.step() in steady state (state already allocated)."""

    params = _PARAMS + [THREADS]
    param_names = _NAMES + ["threads"]
    timeout = 300

    def setup(self, algorithm, impl, workload, dtype, threads):
        torch.set_num_threads(threads)
        self.opt = _ready(algorithm, impl, workload, dtype)

    def time_step(self, algorithm, impl, workload, dtype, threads):
        self.opt.step()


class StepMemory:
    """Memory of a freshly built optimizer: process peak RSS and exact optimizer-state bytes."""

    params = _PARAMS
    param_names = _NAMES
    timeout = 300

    def setup(self, algorithm, impl, workload, dtype):
        if not W.supported(algorithm, impl):
            raise W.Unsupported(f"torch has no fused {algorithm} on cpu")
        torch.set_num_threads(THREADS[0])

    def peakmem_step(self, algorithm, impl, workload, dtype):
        # peakmem is the process's maximum RSS, so everything is built here: parameters, gradients,
        # state and the temporaries of three steps.
        W.prepared(algorithm, impl, workload, dtype, warmup_steps=3)

    def track_state_bytes(self, algorithm, impl, workload, dtype):
        return W.state_bytes(W.prepared(algorithm, impl, workload, dtype, warmup_steps=1))

    track_state_bytes.unit = "bytes"


class CudaStep:
    """The same steps on a GPU; skipped (NotImplementedError in setup) where there is none."""

    params = _PARAMS
    param_names = _NAMES
    timeout = 300

    def setup(self, algorithm, impl, workload, dtype):
        if not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device on this machine")
        self.opt = _ready(algorithm, impl, workload, dtype, "cuda")
        torch.cuda.synchronize()

    def time_step(self, algorithm, impl, workload, dtype):
        self.opt.step()
        torch.cuda.synchronize()  # asv's timer is the wall clock: wait for the kernels

    def track_max_memory_allocated(self, algorithm, impl, workload, dtype):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    track_max_memory_allocated.unit = "bytes"


class Threads:
    """What the steps ran with, recorded in every result file: torch's thread count after setup,
    and whether the allocator was made steady."""

    params = [THREADS]
    param_names = ["threads"]

    def setup(self, threads):
        torch.set_num_threads(threads)

    def track_num_threads(self, threads):
        return torch.get_num_threads()

    track_num_threads.unit = "threads"

    def track_steady_allocator(self, threads):
        """1 when glibc malloc's thresholds were fixed for these results (common.ALLOCATOR), else 0."""
        return int(ALLOCATOR.startswith("glibc"))

    track_steady_allocator.unit = "bool"
