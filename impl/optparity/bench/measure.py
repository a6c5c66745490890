"""In-process measurement for `optparity bench`: interleaved blocks (blocks.py) time the steps of
each algorithm/workload/dtype group next to each other and next to the machine's copy_ reference,
and each case also records its exact memory: optimizer-state bytes, and per step the peak of
temporaries and the bytes allocated."""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from optparity.bench import bandwidth
from optparity.bench import blocks as blocks_mod
from optparity.bench.workloads import DTYPES, WORKLOADS, parse_impl, prepared, state_bytes, supported


@dataclass(frozen=True)
class Case:
    algorithm: str
    impl: str
    workload: str
    dtype: str

    @property
    def benchmark(self) -> str:
        """The key `optparity report --compare` matches runs on."""
        return f"{self.algorithm}/{self.impl}/{self.workload}/{self.dtype}"

    @property
    def group(self) -> str:
        """Cases timed together in interleaved blocks: one algorithm, workload and dtype."""
        return f"{self.algorithm}/{self.workload}/{self.dtype}"


@dataclass(frozen=True)
class Budget:
    """How much each case is measured: `blocks` interleaved blocks of about `block_seconds` (and
    at least `min_calls` calls, blocks.calibrate) per round, spread over `layouts` fresh sets of
    tensors (measure_group), and `memory_samples` profiled steps in the first round."""
    blocks: int
    block_seconds: float
    memory_samples: int
    quick: bool = False
    min_calls: int = 1
    layouts: int = 1


FULL = Budget(blocks=24, block_seconds=0.02, memory_samples=2, min_calls=blocks_mod.MIN_CALLS, layouts=4)
QUICK = Budget(blocks=4, block_seconds=0.005, memory_samples=2, quick=True)
REMEASURE_FACTOR = 3  # a re-measurement takes three times the blocks of the first pass (suspects only)

COPY_BENCHMARK = "copy_/torch/4M/float32"  # blocks.REFERENCE_ELEMENTS


def plan(algorithms, impls, workloads, dtypes, device: str = "cpu") -> list[Case]:
    """Every requested combination that exists (torch has no fused Rprop, ...)."""
    return [Case(a, i, w, d) for w in workloads for d in dtypes for a in algorithms for i in impls
            if supported(a, i, device)]


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Kineto prints start/stop banners straight to fd 2 (KINETO_LOG_LEVEL is read only when torch
    loads); keep them out of the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_memory(fn: Callable[[], None], device: str) -> tuple[int, int] | None:
    """(peak, allocated): bytes by which allocated memory peaked above its starting level while fn
    ran, and the bytes fn allocated in total. On CUDA the caching allocator's counters
    (torch.cuda.max_memory_allocated); on the CPU the profiler's allocation/free records, exact
    unlike RSS, which misses temporaries served from already-resident heap pages. None when this
    torch's profiler does not expose the records."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        before = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0)
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_stats().get("allocated_bytes.all.allocated", 0) - before
        return torch.cuda.max_memory_allocated() - base, allocated
    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    events.sort(key=lambda e: e.start_ns())
    sizes = [e.nbytes() for e in events]
    return max(itertools.accumulate(sizes, initial=0)), sum(n for n in sizes if n > 0)


def _row(case: Case, device: str, threads: int) -> dict:
    wl = WORKLOADS[case.workload]
    library, path = parse_impl(case.impl)
    return {"benchmark": case.benchmark, "algorithm": case.algorithm, "impl": case.impl, "library": library,
            "path": path, "workload": case.workload, "dtype": case.dtype, "numel": wl.numel,
            "n_tensors": wl.n_tensors, "threads": threads, "device": device}


def _memory_rows(opt, base: dict, budget: Budget, device: str) -> list[dict]:
    """Exact memory: optimizer state, parameters + gradients, and per profiled step the peak of
    temporaries above the starting level and the total bytes allocated."""
    param_bytes = sum(2 * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    rows = [{**base, "metric": "state_bytes", "sample": 0, "bytes": state_bytes(opt)},
            {**base, "metric": "param_and_grad_bytes", "sample": 0, "bytes": param_bytes}]
    for i in range(budget.memory_samples):
        step = step_memory(opt.step, device)
        if step is not None:
            rows += [{**base, "metric": "step_peak_bytes", "sample": i, "bytes": step[0]},
                     {**base, "metric": "step_alloc_bytes", "sample": i, "bytes": step[1]}]
    return rows


def _layout(cases: list[Case], device: str, segment: int) -> tuple[dict, torch.Tensor]:
    """Fresh optimizers for one segment of blocks, allocated after a spacer whose size differs per
    segment (multiples of 64 bytes, torch's CPU alignment), so that their tensors sit at other
    addresses and offsets than the previous segment's (which are still alive while these are
    allocated). A run-level effect of the layout (the first tracker proof: one run's SGD foreach
    ratio at 0.90 against 0.97-0.98 in four others) then shows up in the spread between the
    blocks of one run instead of deciding the whole run."""
    spacer = torch.empty(16 * (1 + 37 * segment % 61), dtype=torch.float32, device=device)
    return {c.benchmark: prepared(c.algorithm, c.impl, c.workload, c.dtype, device) for c in cases}, spacer


def measure_group(cases: list[Case], *, threads: int, budget: Budget, device: str = "cpu", blocks: int | None = None,
                  with_memory: bool = True) -> tuple[list[dict], list[dict]]:
    """Time the cases of one algorithm/workload/dtype in interleaved blocks with the copy_
    reference (blocks.interleaved), in `budget.layouts` segments with fresh tensors each
    (_layout), then record their memory. (timing rows, memory rows); the copy_ reference comes
    back as rows of COPY_BENCHMARK too."""
    n_blocks = blocks or budget.blocks
    segments = max(1, min(budget.layouts, n_blocks))
    copy_fn, copy_bytes = blocks_mod.copy_reference(device)
    rows, opts, spacer, start = [], None, None, 0
    for seg in range(segments):
        opts, spacer = _layout(cases, device, seg)  # the previous segment's die only after this allocation
        count = n_blocks // segments + (seg < n_blocks % segments)
        rows += blocks_mod.interleaved({k: blocks_mod.block_timer(o.step, device) for k, o in opts.items()},
                                       blocks_mod.block_timer(copy_fn, device), count, budget.block_seconds,
                                       min_calls=budget.min_calls, first_block=start)
        start += count
    by_case = {c.benchmark: c for c in cases}
    timing, copies = [], {}
    for r in rows:
        case = by_case[r.pop("key")]
        moved = bandwidth.bytes_per_element(case.algorithm, DTYPES[case.dtype]) * WORKLOADS[case.workload].numel
        timing.append({**_row(case, device, threads), **r, "bytes_per_step": moved, "group": case.group})
        copies[r["block"]] = (r["copy_seconds"], r["copy_cpu_seconds"])
    group = cases[0]
    copy_base = {"benchmark": COPY_BENCHMARK, "algorithm": "copy_", "impl": "torch", "library": "torch",
                 "path": "copy", "workload": "4M", "dtype": "float32", "numel": blocks_mod.REFERENCE_ELEMENTS,
                 "n_tensors": 1, "threads": threads, "device": device, "group": group.group}
    timing += [{**copy_base, "block": b, "seconds": w, "cpu_seconds": c, "number_per_run": 1, "copy_seconds": w,
                "copy_cpu_seconds": c, "bytes_per_step": copy_bytes} for b, (w, c) in copies.items()]
    memory = []
    if with_memory:
        for c in cases:
            memory += _memory_rows(opts[c.benchmark], _row(c, device, threads), budget, device)
    del opts, spacer, copy_fn
    gc.collect()
    return timing, memory


def groups(cases: list[Case]) -> list[list[Case]]:
    """The cases grouped by algorithm, workload and dtype, in plan order."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.group, []).append(c)
    return list(out.values())


def run(cases: list[Case], *, threads: int, budget: Budget, device: str = "cpu", rounds: int = 1,
        advance: Callable[[str], None] = lambda label: None, remeasure: int = 0) -> tuple[list[dict], list[dict]]:
    """Every group `rounds` times, odd rounds in reverse group order. Memory is recorded in the
    first round (it is exact). `remeasure` > 0 marks the rows as that re-measurement pass and
    takes REMEASURE_FACTOR times the blocks; `sample` numbers each benchmark's rows of the pass."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False on this machine")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # calibration and warm-up steps run with the same thread count
    timing: list[dict] = []
    memory: list[dict] = []
    n_blocks = budget.blocks * (REMEASURE_FACTOR if remeasure else 1)
    try:
        for rnd in range(rounds):
            todo = groups(cases)
            for group in (todo if rnd % 2 == 0 else todo[::-1]):
                t, mem = measure_group(group, threads=threads, budget=budget, device=device, blocks=n_blocks,
                                       with_memory=rnd == 0 and not remeasure)
                timing += [{**r, "round": rnd, "pass": remeasure} for r in t]
                memory += mem
                for c in group:
                    advance(c.benchmark)
    finally:
        torch.set_num_threads(previous)
    counter: dict[str, int] = {}
    for row in timing:
        row["sample"] = counter[row["benchmark"]] = counter.get(row["benchmark"], -1) + 1
    return timing, memory
