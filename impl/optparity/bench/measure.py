"""In-process measurement for `optparity bench`: torch.utils.benchmark times the steps, and each
case also records its optimizer-state bytes and the peak of temporary allocations during a step."""
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
from torch.utils.benchmark import Timer

from optparity.bench import bandwidth
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


@dataclass(frozen=True)
class Budget:
    """How long torch.utils.benchmark's adaptive_autorange may take per case: it stops once
    IQR/median < threshold (after min_run_time and at least four blocks) or at max_run_time."""
    threshold: float
    min_run_time: float
    max_run_time: float
    memory_samples: int


FULL = Budget(threshold=0.05, min_run_time=0.3, max_run_time=3.0, memory_samples=5)
QUICK = Budget(threshold=0.2, min_run_time=0.02, max_run_time=0.3, memory_samples=3)

COPY_BENCHMARK = "copy_/torch/16M/float32"


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


def peak_growth(fn: Callable[[], None], device: str) -> int | None:
    """Bytes by which allocated memory peaked above its starting level while fn ran: the CUDA
    allocator's peak, or on CPU the running sum of the profiler's allocation/free records
    (exact, unlike RSS, which misses temporaries served from already-resident heap pages).
    None when this torch's profiler does not expose the records."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _row(case: Case, device: str, threads: int) -> dict:
    wl = WORKLOADS[case.workload]
    library, path = parse_impl(case.impl)
    return {"benchmark": case.benchmark, "algorithm": case.algorithm, "impl": case.impl, "library": library,
            "path": path, "workload": case.workload, "dtype": case.dtype, "numel": wl.numel,
            "n_tensors": wl.n_tensors, "threads": threads, "device": device}


def measure_case(case: Case, *, threads: int, budget: Budget, device: str = "cpu") -> tuple[list[dict], list[dict]]:
    """(timing rows: one per torch.utils.benchmark sample, memory rows)."""
    opt = prepared(case.algorithm, case.impl, case.workload, case.dtype, device)
    base = _row(case, device, threads)
    moved = bandwidth.bytes_per_element(case.algorithm, DTYPES[case.dtype]) * base["numel"]
    timer = Timer("opt.step()", globals={"opt": opt}, num_threads=threads, label=case.algorithm,
                  sub_label=f"{case.workload} {case.dtype}", description=case.impl)
    m = timer.adaptive_autorange(threshold=budget.threshold, min_run_time=budget.min_run_time,
                                 max_run_time=budget.max_run_time)
    timing = [{**base, "sample": i, "seconds": t, "number_per_run": m.number_per_run, "bytes_per_step": moved}
              for i, t in enumerate(m.times)]
    param_bytes = sum(2 * p.numel() * p.element_size() for g in opt.param_groups for p in g["params"])
    memory = [{**base, "metric": "state_bytes", "sample": 0, "bytes": state_bytes(opt)},
              {**base, "metric": "param_and_grad_bytes", "sample": 0, "bytes": param_bytes}]
    for i in range(budget.memory_samples):
        peak = peak_growth(opt.step, device)
        if peak is not None:
            memory.append({**base, "metric": "step_peak_bytes", "sample": i, "bytes": peak})
    del opt, timer
    gc.collect()
    return timing, memory


def measure_copy(*, threads: int, budget: Budget, device: str = "cpu") -> list[dict]:
    """Samples of the streaming-copy roofline, in the same row layout as the optimizer cases."""
    timer, moved = bandwidth.copy_timer(device, threads)
    m = timer.adaptive_autorange(threshold=budget.threshold, min_run_time=budget.min_run_time,
                                 max_run_time=budget.max_run_time)
    base = {"benchmark": COPY_BENCHMARK, "algorithm": "copy_", "impl": "torch", "library": "torch",
            "path": "copy", "workload": "16M", "dtype": "float32", "numel": bandwidth.COPY_ELEMENTS,
            "n_tensors": 1, "threads": threads, "device": device}
    rows = [{**base, "sample": i, "seconds": t, "number_per_run": m.number_per_run, "bytes_per_step": moved}
            for i, t in enumerate(m.times)]
    del timer
    gc.collect()
    return rows


def run(cases: list[Case], *, threads: int, budget: Budget, device: str = "cpu", rounds: int = 1,
        advance: Callable[[str], None] = lambda label: None) -> tuple[list[dict], list[dict]]:
    """The copy roofline, every case `rounds` times, then the copy again, so that drift of the
    machine shows up in the spread. Odd rounds go through the cases in reverse order: neither
    library of a pair always runs first. Memory is recorded in the first round (it is exact)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch.cuda.is_available() is False on this machine")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # warm-up steps run outside the Timer: same thread count
    try:
        timing = [{**r, "round": 0} for r in measure_copy(threads=threads, budget=budget, device=device)]
        memory: list[dict] = []
        for rnd in range(rounds):
            for case in (cases if rnd % 2 == 0 else cases[::-1]):
                t, mem = measure_case(case, threads=threads, budget=budget, device=device)
                timing += [{**r, "round": rnd} for r in t]
                memory += mem if rnd == 0 else []
                advance(case.benchmark)
        timing += [{**r, "round": rounds - 1} for r in measure_copy(threads=threads, budget=budget, device=device)]
    finally:
        torch.set_num_threads(previous)
    counter: dict[str, int] = {}
    for row in timing:  # `sample` numbers a benchmark's samples across rounds
        row["sample"] = counter[row["benchmark"]] = counter.get(row["benchmark"], -1) + 1
    return timing, memory
