"""The distributed check, parent side: resolve the candidate and its kind, build the cases, run
them in long-lived ranks (harness/ranks.py's RankPool, one per world size; under torchrun the
job's own ranks), and turn the ranks' outcomes into the same CaseResults, verdicts and reports
as the single-process check (harness/check.py, runner.py, report.py).

prepare() raises check.UsageError (exit code 2) for every bad input before any rank starts;
run() runs a prepared plan; check() is both.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from optparity.harness import levels
from optparity.harness.candidates import load_object
from optparity.harness.check import CheckReport, NoCases, UsageError
from optparity.harness.distributed import matrix as dmatrix
from optparity.harness.distributed.base import DistCase
from optparity.harness.distributed.rank import RankOutcome, run_on_rank
from optparity.harness.distributed.registry import detect, driver, kinds
from optparity.harness.ranks import InProcessRanks, RankError, RankPool, _is_collective_failure, under_torchrun
from optparity.harness.runner import (CaseResult, Divergence, RunOptions, Verdict, _classify, _Tracker,
                                      matches_filter)
from optparity.harness.algorithms import ALGORITHMS

DEFAULT_TIMEOUT = 120.0  # seconds per distributed case before its ranks are reported hung
BACKENDS = ("gloo", "nccl")


@dataclass
class DistPlan:
    candidate: str  # "module:Name": what the ranks import
    label: str
    kind: str
    reference: str  # how the report names the reference
    reference_spec: str | None
    cases: list[DistCase]
    backend: str
    run_options: dict = field(default_factory=dict)  # RunOptions fields

    @property
    def world_sizes(self) -> list[int]:
        return sorted({c.world_size for c in self.cases})

    def new_report(self) -> CheckReport:
        return CheckReport(self.label, self.reference, planned=len(self.cases))


def _importable(obj: Any, flag: str) -> str:
    """The "module:qualname" the ranks import `obj` by (spawned ranks cannot be handed a class)."""
    if isinstance(obj, str):
        return obj
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    spec = f"{module}:{name}"
    try:
        ok = module is not None and name is not None and "<locals>" not in name and load_object(spec) is obj
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"{flag} {obj!r}: the ranks import the candidate by name, and {spec} does not name it; "
                         f"define it at the top level of an importable module")
    return spec


def check_backend(backend: str | None, world_sizes: list[int]) -> str:
    """The backend to use; UsageError when this machine lacks it."""
    backend = backend or "gloo"
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: unknown; use gloo or nccl")
    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed")
    if backend == "gloo" and not dist.is_gloo_available():
        raise UsageError("--backend gloo: this torch build has no Gloo")
    if backend == "nccl":
        if not dist.is_nccl_available():
            raise UsageError("--backend nccl: this torch build has no NCCL")
        gpus = torch.cuda.device_count()
        need = 1 if under_torchrun() else max(world_sizes)
        if gpus < need:
            raise UsageError(f"--backend nccl: NCCL needs one CUDA device per rank (world size {max(world_sizes)}) "
                             f"and this machine has {gpus}")
    return backend


def _world_sizes(world_sizes) -> list[int]:
    if under_torchrun():
        job = int(__import__("os").environ["WORLD_SIZE"])
        if world_sizes and list(world_sizes) != [job]:
            raise UsageError(f"--world-sizes {','.join(map(str, world_sizes))}: under torchrun the world size is the "
                             f"job's ({job}); pass --world-sizes {job} or leave it out")
        return [job]
    if not world_sizes:
        return [2, 3]
    sizes = list(world_sizes)
    bad = [w for w in sizes if not isinstance(w, int) or isinstance(w, bool) or w < 1]
    if bad:
        raise UsageError(f"--world-sizes: every world size must be a whole number of at least 1, got {bad[0]!r}")
    return sorted(set(sizes))


def prepare(candidate: Any, reference: Any = None, *, kind: str | None = None, world_sizes=None,
            backend: str | None = None, algorithm: str | None = None, level: str = "default",
            dtypes=None, paths=None, param_sets=None, steps: int | None = None, case_filter: str | None = None,
            hyper: dict | None = None, numerics_only: bool = False, max_ulp: int | None = None,
            **run_options) -> DistPlan:
    """Everything the distributed check needs, resolved in this process; UsageError otherwise."""
    from optparity.harness.check import _check_run_options

    options = dict(hyper=dict(hyper or {}), numerics_only=numerics_only, max_ulp=max_ulp, **run_options)
    _check_run_options(options)
    try:
        levels.level(level)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise UsageError(f"unknown --algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    sizes = _world_sizes(world_sizes)
    backend = check_backend(backend, sizes)
    spec = _importable(candidate, "--candidate")
    try:
        obj = load_object(spec)
    except ValueError as e:
        raise UsageError(f"--candidate {spec}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's module raised while importing
        raise UsageError(f"--candidate {spec}: loading it raised {type(e).__name__}: {e}") from e
    if kind is None:
        try:
            kind = detect(obj)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        drv = driver(kind)
        drv.validate(obj)
    except ValueError as e:
        raise UsageError(f"--candidate {spec} --kind {kind}: {e}" if kind in kinds() else str(e)) from None
    reference_spec = None if reference is None else _importable(reference, "--reference")
    if reference_spec is not None and not getattr(drv, "takes_reference", False):
        raise UsageError(f"--reference: kind {kind} always compares with {drv.reference_label(obj, algorithm or 'ALGO')}")
    algos = drv.algorithms(obj, algorithm, level)
    cases = []
    for algo in algos:
        cases += dmatrix.build_cases(drv, algo, level, sizes, backend, dtypes=dtypes, paths=paths,
                                     param_sets=param_sets, steps=steps, conditions=drv.conditions_for(obj))
    if case_filter:
        cases = [c for c in cases if matches_filter(c.id, case_filter)]
        if not cases:
            raise NoCases(f"no case id matches --filter {case_filter!r}")
    if not cases:
        raise NoCases(f"no distributed case to run for {spec} with these options")
    label = spec if isinstance(candidate, str) else spec
    ref_label = drv.reference_label(obj, algos[0] if len(algos) == 1 else "<algorithm>")
    return DistPlan(spec, label, kind, ref_label, reference_spec, cases, backend, options)


# --- running ------------------------------------------------------------------------------------

_WHERE_ORDER = {"param": 0, "ranks": 1, "state": 2, "state_dict": 3, "param_groups": 4}


def _first(divs):
    divs = [d for d in divs if d is not None]
    return min(divs, key=lambda d: (d.step, _WHERE_ORDER.get(d.where, 9), d.rank or 0), default=None)


def _waited_on_peer(tb: str) -> bool:
    """An error a rank meets in a collective because a peer is gone or stuck (Gloo: "Application
    timeout caused pair closure", "Connection closed by peer", ...)."""
    if not tb:
        return False
    last = tb.strip().splitlines()[-1].lower()
    return _is_collective_failure(tb) or "timeout" in last or "pair closure" in last


def merge(case: DistCase, outcomes: list[RankOutcome], options: RunOptions) -> CaseResult:
    """The ranks' outcomes as one CaseResult, classified by runner's own rules."""
    result = CaseResult(case, numerics_only=options.numerics_only, max_ulp=options.max_ulp)
    result.seconds = max(o.seconds for o in outcomes)
    refused = next((o.not_applicable for o in outcomes if o.not_applicable), None)
    if refused is not None:
        result.verdict, result.message = Verdict.NOT_APPLICABLE, refused[0]
        result.rejected_options = list(refused[1])
        return result
    trackers = [o.tracker for o in outcomes]
    merged = _Tracker()
    merged.first_numeric = _first(t.first_numeric for t in trackers)
    merged.first_api = _first(t.first_api for t in trackers)
    # the error to show: one a rank raised itself, before one its peers met in a collective
    erring = [o.tracker for o in outcomes if o.tracker.error is not None]
    own = [o.tracker for o in outcomes if o.tracker.error is not None and not o.peer_failure
           and not _waited_on_peer(o.tracker.traceback)]
    chosen = min(own or erring, key=lambda t: (t.error.step, t.error.rank or 0), default=None)
    if chosen is not None:
        merged.error, merged.traceback = chosen.error, chosen.traceback
        merged.error_one_side = any(t.error_one_side for t in erring)
    worst = max(trackers, key=lambda t: t.worst_ulp)
    merged.worst_ulp, merged.worst = worst.worst_ulp, worst.worst
    merged.max_abs = max(t.max_abs for t in trackers)
    merged.max_rel = max(t.max_rel for t in trackers)
    merged.nan = max(t.nan for t in trackers)  # every rank sees the same full tensors: not a sum
    merged.inf = max(t.inf for t in trackers)
    for t in trackers:
        for step, row in t.per_step.items():
            into = merged.per_step.setdefault(step, dict(row))
            for key, value in row.items():
                into[key] = max(into[key], value)
    result.steps_run = max(o.steps_run for o in outcomes)
    _classify(result, merged, options)
    return result


def _failed(case: DistCase, error: RankError, seconds: float) -> CaseResult:
    """A case whose ranks could not finish: a rank raised outside the sides, died or hung."""
    text = str(error)
    found = re.search(r"rank (\d+)", text)
    rank = int(found.group(1)) if found else None
    verdict = Verdict.HUNG if " hung " in f" {text} " else Verdict.ERROR_ONE_SIDE
    div = Divergence(0, "error", None, None, None, text.splitlines()[0], rank=rank, world_size=case.world_size)
    result = CaseResult(case, verdict, divergence=div, error=div, message=div.describe(), seconds=seconds,
                        traceback=text[-6000:])
    return result


def _start_method(backend: str) -> str:
    """"fork" when it is safe (ranks then start in a fraction of a second, with torch, the kinds and
    torch.optim's lazily imported torch._dynamo already loaded), else "spawn"."""
    import importlib
    import multiprocessing

    from optparity.harness.check import _forked_openmp_works

    if (backend != "gloo" or "fork" not in multiprocessing.get_all_start_methods() or torch.cuda.is_initialized()
            or not _forked_openmp_works()):
        return "spawn"
    importlib.import_module("torch._dynamo")  # torch.optim imports it at its first step: once here, not per rank

    from optparity.harness.distributed.registry import drivers

    drivers()
    return "fork"


class Pools:
    """Long-lived ranks per world size, started on first use and replaced after a failure."""

    def __init__(self, backend: str, timeout: float):
        self.backend, self.timeout = backend, timeout
        self._pools: dict[int, Any] = {}
        self._job = None

    def get(self, world_size: int):
        if under_torchrun():
            if self._job is None:
                if not dist.is_initialized():  # the job's group, on the backend asked for
                    if self.backend == "nccl":
                        torch.cuda.set_device(int(__import__("os").environ["LOCAL_RANK"]))
                    dist.init_process_group(self.backend)
                self._job = InProcessRanks()
            return self._job
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size, self.backend, timeout=self.timeout,
                                                      collective_timeout=max(5.0, min(30.0, self.timeout / 3)),
                                                      start_method=_start_method(self.backend))
        return pool

    def drop(self, world_size: int) -> None:
        pool = self._pools.pop(world_size, None)
        if pool is not None:
            pool.close()

    def close(self) -> None:
        for ws in list(self._pools):
            self.drop(ws)


def run_case(plan: DistPlan, case: DistCase, pools: Pools) -> CaseResult:
    start = time.perf_counter()
    try:
        pool = pools.get(case.world_size)
        outcomes = pool.run(run_on_rank, plan.kind, plan.candidate, case, plan.run_options,
                            plan.reference_spec, timeout=pools.timeout)
    except RankError as e:
        pools.drop(case.world_size)  # closed already; a fresh one for the next case
        return _failed(case, e, time.perf_counter() - start)
    if any(o.uneven_error for o in outcomes) and not under_torchrun():
        pools.drop(case.world_size)  # some ranks raised mid-collective: do not reuse the group
    return merge(case, outcomes, RunOptions(**plan.run_options))


def run(plan: DistPlan, *, fail_fast: bool = False, timeout: float | None = None,
        progress: Callable[[CaseResult], None] | None = None, report: CheckReport | None = None,
        pools: Pools | None = None) -> CheckReport:
    """Run every case of `plan`, world size by world size. `pools`: ranks to reuse (tests share
    them across checks); by default started here and closed at the end."""
    report = plan.new_report() if report is None else report
    own = pools is None
    pools = pools or Pools(plan.backend, timeout or DEFAULT_TIMEOUT)
    order = sorted(range(len(plan.cases)), key=lambda i: (plan.cases[i].world_size, i))
    try:
        with report.running():
            for index in order:
                result = run_case(plan, plan.cases[index], pools)
                report.add(index, result)
                if progress is not None:
                    progress(result)
                if fail_fast and result.status == "fail":
                    break
    finally:
        if own:
            pools.close()
    return report


def check(candidate: Any, reference: Any = None, *, kind: str | None = None, world_sizes=None,
          backend: str | None = None, fail_fast: bool = False, timeout: float | None = None,
          progress: Callable[[CaseResult], None] | None = None, pools: Pools | None = None,
          **options) -> CheckReport:
    """optparity.check(..., kind=, world_sizes=, backend=): the distributed check (see prepare)."""
    plan = prepare(candidate, reference, kind=kind, world_sizes=world_sizes, backend=backend, **options)
    return run(plan, fail_fast=fail_fast, timeout=timeout, progress=progress, pools=pools)
