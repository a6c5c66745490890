"""Single-process optimizer steps: latency and memory, optparity vs torch on every path.

Matrix: algorithm x implementation (optparity forloop/foreach, torch forloop/foreach/fused) x
workload (1M, 16M, transformer) x dtype (float32, bfloat16). Combinations that do not exist
(torch has no fused Rprop) raise NotImplementedError in setup, which asv records as skipped.
"""
from __future__ import annotations

import functools

import torch

from .common import ALLOCATOR, THREADS, blocks as B, workloads as W

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


class StepRatio:
    """The normalised figures of `optparity bench` (docs/regression-tracking.md), as asv track_
    results: optparity's step over torch's on the same path, from interleaved blocks in CPU
    time, median over the blocks. A machine that is slower as a whole moves both sides, so this
    figure holds still on an unchanged commit where StepTime's seconds do not; asv's rule (a
    factor, -f) applies to it unchanged."""

    params = [list(W.ALGORITHMS), ["forloop", "foreach"], list(W.WORKLOADS), list(W.DTYPES)]
    param_names = ["algorithm", "path", "workload", "dtype"]
    timeout = 600
    blocks = 24
    block_seconds = 0.02

    def setup(self, algorithm, path, workload, dtype):
        torch.set_num_threads(THREADS[0])
        self.opts = {lib: W.prepared(algorithm, f"{lib}-{path}", workload, dtype) for lib in ("optparity", "torch")}

    def track_ratio_to_torch(self, algorithm, path, workload, dtype):
        copy_fn, _ = B.copy_reference()
        rows = B.interleaved({lib: B.block_timer(o.step) for lib, o in self.opts.items()}, B.block_timer(copy_fn),
                             self.blocks, self.block_seconds)
        cpu = {(r["key"], r["block"]): r["cpu_seconds"] for r in rows}
        ratios = sorted(cpu[("optparity", b)] / cpu[("torch", b)] for b in range(self.blocks))
        return (ratios[(self.blocks - 1) // 2] + ratios[self.blocks // 2]) / 2

    track_ratio_to_torch.unit = "optparity/torch"


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
