"""Interleaved block timing: the measurements that travel between runs.

A timing taken on a shared machine carries that moment's load. So every benchmark of a group
(one algorithm, workload and dtype: optparity's and torch's paths side by side) is timed in short
blocks taken in turn, A B C copy, C B A copy, B C A copy, ..., and every block is stored with the
machine's `copy_` reference taken right after it. The figures compared across runs are then
ratios of neighbouring blocks (optparity / torch on the same path, time / copy_), in which a
machine-wide slowdown cancels out.

A block's figure is the median of its calls, each timed on its own, not the block's mean: the
first calls after the copy_ (and after the other paths) find the caches cold, and in a mean
that cost is spread over the block's call count, which calibration sets per benchmark from a
noisy single call. Measured here (SGD 1M, forloop): the mean per call was 4.6e-4 s over 5
calls, 2.7e-4 over 20, 2.3e-4 over 80; in the first tracker proof, optparity and torch blocks
of 27 and 37 calls gave a 1.15x "regression" on an unchanged commit. The median of the calls
does not depend on the count.

Each block records two clocks: the wall clock (CUDA events on a GPU) and the CPU time of this
process (time.process_time). On a shared machine the wall clock of a block also counts the time
slices other processes got (measured here: optparity/torch paired ratios of Adam spread over
q1..q3 = 0.94..1.25 on the wall clock, 0.98..1.05 in CPU time, under a load average of 10 on two
cores), so comparisons use CPU time on the CPU and event time on a GPU (where the CPU time of
a block is the host's launch overhead only and is replaced by the event time).

torch.utils.benchmark's Timer is not used for the blocks: every timeit() call first runs warm-up
steps of its own (at least two), which would triple the cost of the 16M workloads for nothing,
since the group's steps already keep each other warm. This module imports only torch and the
standard library: the asv suite loads it by path, for commits older than optparity.bench.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

MAX_NUMBER = 1000  # calls per block at most (the tiniest steps)


Timer = Callable[[int], "tuple[float, float]"]


def block_timer(fn: Callable[[], object], device: str = "cpu") -> Timer:
    """A function number -> (wall seconds, CPU seconds) per call of fn over `number` back-to-back
    calls: on the CPU the medians of the calls timed one by one. On a GPU the wall figure comes from CUDA events (after a synchronize) and stands for
    both: the device's time is what a step costs there."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_cuda(number: int) -> tuple[float, float]:
            torch.cuda.synchronize()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / number
            return seconds, seconds

        return run_cuda

    def once() -> tuple[float, float]:
        # per-call clocks (process_time costs about 1 us here, the same for every path)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        c1 = time.process_time()
        return time.perf_counter() - w0, c1 - c0

    def run_cpu(number: int) -> tuple[float, float]:
        calls = [once() for _ in range(number)]
        return statistics.median(c[0] for c in calls), statistics.median(c[1] for c in calls)

    run_cpu.once = once  # interleaved() alternates single calls of the paths within a block
    return run_cpu


MIN_CALLS = 10            # a block's median needs enough calls: Adam 1M (4-5 ms a step) got 4-5 in 20 ms
MAX_BLOCK_SECONDS = 0.1   # ... but steps of tens of ms keep short blocks (the 16M matrix stays affordable)


def calibrate(run: Timer, block_seconds: float, min_calls: int = 1) -> int:
    """Calls per block so that a block takes about block_seconds of CPU time, or min_calls calls
    where that is longer, up to MAX_BLOCK_SECONDS (the smaller of two single calls' CPU times, so
    that one disturbed call does not shrink every block). The median of 4-5 calls spread the
    optparity/torch ratio of Adam 1M over about +-10% under load; min_calls sets a floor."""
    once = max(min(run(1)[1], run(1)[1]), 1e-9)
    target = max(block_seconds, min(min_calls * once, MAX_BLOCK_SECONDS))
    return max(1, min(MAX_NUMBER, round(target / once)))


REFERENCE_ELEMENTS = 1 << 22  # 16 MiB per fp32 tensor, 32 MiB moved: past the private caches


def copy_reference(device: str = "cpu", numel: int = REFERENCE_ELEMENTS) -> tuple[Callable[[], object], int]:
    """dst.copy_(src) on fp32 tensors beyond the caches, and the bytes one copy moves."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * numel * src.element_size()


def _alternating(timers: dict[str, Timer], numbers: dict[str, int], order: list[str]) -> dict[str, tuple[float, float]]:
    calls: dict[str, list[tuple[float, float]]] = {k: [] for k in order}
    for sweep in range(max(numbers.values())):
        for k in (order if sweep % 2 == 0 else order[::-1]):
            if sweep < numbers[k]:
                calls[k].append(timers[k].once())
    return {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v)) for k, v in calls.items()}


def interleaved(timers: dict[str, Timer], reference: Timer, blocks: int, block_seconds: float, *,
                min_calls: int = 1, first_block: int = 0) -> list[dict]:
    """`blocks` rounds over every timer in rotating order, each round followed by one reference
    call. One row per timer and block: key, block, seconds and cpu_seconds (per call),
    number_per_run, copy_seconds and copy_cpu_seconds (the reference of that block). Blocks are
    numbered from first_block, and the rotation continues from there (a run measured in several
    segments, one per memory layout, keeps the rotation of one long run).

    CPU timers (block_timer's, with `once`) alternate within a block: one call of each path in
    turn, the order reversed on every sweep, until each has made its calls, and each path's figure
    is the median of its calls. The paths of a block then share the same moments of the machine
    and the same cache state (each call follows another path's step, never the copy_ alone). Timed
    back to back instead, 10 calls a path, the optparity/torch ratio of Adam 1M spread over blocks
    with a standard deviation of about 0.11 (log) under a load of 15-20 on two cores, as wide as
    either path's own spread; alternating calls measured 0.056 in the same conditions. Timers
    without `once` (CUDA events, test doubles) run their calls back to back."""
    keys = list(timers)
    numbers = {k: calibrate(timers[k], block_seconds, min_calls) for k in keys}
    alternate = all(hasattr(t, "once") for t in timers.values())
    if alternate:  # the same calls for every path, so that each call has partners (the median count: calibration is noisy)
        common = round(statistics.median(numbers.values()))
        numbers = {k: common for k in keys}
    rows = []
    for b in range(first_block, first_block + blocks):
        # each rotation forwards, then reversed: over 2 x len(keys) blocks every key takes every
        # position equally often (rotating on every block and reversing odd ones put A first in
        # every block of a pair, and never B or D first in a group of four)
        shift = (b // 2) % len(keys)
        order = keys[shift:] + keys[:shift]
        if b % 2:
            order = order[::-1]
        seconds = _alternating(timers, numbers, order) if alternate else {k: timers[k](numbers[k]) for k in order}
        ref = reference(1)
        rows += [{"key": k, "block": b, "seconds": seconds[k][0], "cpu_seconds": seconds[k][1],
                  "number_per_run": numbers[k], "copy_seconds": ref[0], "copy_cpu_seconds": ref[1]} for k in keys]
    return rows
