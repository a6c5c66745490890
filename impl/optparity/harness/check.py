"""optparity.check: run a candidate optimizer against its reference over the case matrix, in this
process or in worker processes watched for hangs.

prepare() resolves the candidate, the reference and the cases (every usage error is raised there,
as UsageError, before any case runs); run() runs a prepared plan; check() is both.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any, Callable

import torch

from optparity.harness import levels, matrix, runner
from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU
from optparity.harness.candidates import GENERIC_PARAM_SETS, generic_cases
from optparity.harness.runner import CaseResult, RunOptions, Subject, Verdict, default_reference, run_case

DEFAULT_TIMEOUT = 60.0  # seconds per case in the CLI; the slowest full-level case takes a few


class UsageError(ValueError):
    """Bad input, found before any case runs (the CLI's exit code 2)."""


class NoCases(UsageError):
    """The options select no case of this candidate (`check --all` skips such candidates)."""


@dataclass
class CheckReport:
    candidate: str
    reference: str
    results: list[CaseResult] = field(default_factory=list)  # in case order, whatever the workers
    seconds: float = 0.0
    planned: int = 0  # cases the plan holds
    finished: bool = False  # the run ended (every case ran, or fail_fast stopped it)
    interrupted: bool = False  # stopped by Ctrl-C: results are partial
    _order: list[int] = field(default_factory=list, repr=False)  # case index of each result

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def ok(self) -> bool:
        """True only when the run finished and every case is bit-identical."""
        return (self.finished and not self.interrupted and bool(self.results) and not self.failed
                and any(r.numbers_match for r in self.results))

    @property
    def first_failure(self) -> CaseResult | None:
        return self.failed[0] if self.failed else None

    @property
    def worst_ulp(self) -> int:
        return max((r.worst_ulp for r in self.results), default=0)

    @property
    def cases_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds else 0.0

    @contextlib.contextmanager
    def running(self):
        """Time the body; it finishing marks the report finished, Ctrl-C marks it interrupted
        (KeyboardInterrupt propagates). Shared by the single-process and distributed runs."""
        start = time.perf_counter()
        try:
            yield self
            self.finished = True
        except KeyboardInterrupt:
            self.interrupted = True
            raise
        finally:
            self.seconds = time.perf_counter() - start

    def add(self, index: int, result: CaseResult) -> None:
        """Insert the result of case `index`, keeping case order."""
        pos = bisect.bisect(self._order, index)
        self._order.insert(pos, index)
        self.results.insert(pos, result)

    def truncate(self, last_index: int) -> None:
        keep = bisect.bisect(self._order, last_index)
        del self._order[keep:], self.results[keep:]


@dataclass
class Plan:
    """What one check runs. Forked workers inherit it, so the candidate need not be picklable."""

    candidate: Subject
    reference: Subject
    cases: list[matrix.Case]
    run_options: dict = field(default_factory=dict)  # keyword arguments for runner.run_case
    notes: list = field(default_factory=list)  # what prepare() changed (configurations --hyper made the same)

    def new_report(self) -> CheckReport:
        return CheckReport(self.candidate.label, self.reference.label, planned=len(self.cases))


def _subject(spec: Any, algorithm: str | None, flag: str) -> Subject:
    try:
        return Subject.of(spec, algorithm)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{flag} {spec}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a module that raises at import is the user's input error
        raise UsageError(f"{flag} {spec}: loading it raised {type(e).__name__}: {e}") from e


def resolve_device(flag: str, text: Any) -> str:
    """"cpu", "cuda" or "cuda:N" as a Case holds it; UsageError for anything this machine cannot run.
    Asks torch.cuda.device_count(), which (with NVML) does not initialise CUDA in this process, so
    forked workers can still use the GPU."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{flag} {text}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise UsageError(f"{flag} {text}: there is one CPU device; use cpu")
        return "cpu"
    if device.type != "cuda":
        raise UsageError(f"{flag} {text}: only cpu and cuda[:N] are supported, not {device.type}")
    count = torch.cuda.device_count()
    if count == 0:
        why = ("torch.cuda.is_available() is False" if torch.backends.cuda.is_built()
               else f"torch.cuda.is_available() is False: this torch ({torch.__version__}) is built without CUDA")
        raise UsageError(f"{flag} {text}: this machine has no CUDA device ({why})")
    if device.index is not None and device.index >= count:
        have = ", ".join(f"cuda:{i}" for i in range(count))
        raise UsageError(f"{flag} {text}: no such CUDA device; this machine has {count} ({have})")
    return str(device)


def _no_cases(algo: str, paths, dtypes, param_sets, devices=("cpu",)) -> str:
    lacking = [d for d in devices if not matrix._has_fused(algo, d)]
    if paths and set(paths) <= {"fused"} and lacking:
        have = [p for p in matrix.PATHS if p != "fused"]
        where = "CUDA" if matrix.device_type(lacking[0]) == "cuda" else "CPU"
        return f"no case to run: {algo} has no fused {where} path (--paths fused); its paths are {', '.join(have)}"
    chosen = [f"{flag} {','.join(str(v).replace('torch.', '') for v in vals)}"
              for flag, vals in (("--paths", paths), ("--dtypes", dtypes), ("--param-sets", param_sets)) if vals]
    return f"no case to run for {algo} with {' '.join(chosen) or 'these options'}"


def prepare(candidate: Any, reference: Any = None, *, algorithm: str | None = None, level: str = "default",
            paths=None, dtypes=None, param_sets=None, steps: int | None = None,
            cases: list[matrix.Case] | None = None, case_filter: str | None = None,
            device: str | None = None, reference_device: str | None = None, **run_options) -> Plan:
    """Resolve everything a check needs; raises UsageError (naming the option) for bad input.

    case_filter: keep the cases whose id contains it or matches it as a regular expression.
    device: where the candidate's parameters, gradients and state live ("cpu", the default, "cuda",
    "cuda:N"; given with `cases`, it moves those cases there). reference_device: where the
    reference's do, when elsewhere: then the cases compare across devices, and distances are
    measured and reported (verdict "measured across devices"), not claimed zero.
    run_options are passed on to runner.run_case for every case (hyper=, numerics_only=, max_ulp=,
    rounding_ulp=: see runner.RunOptions)."""
    _check_run_options(run_options)
    on = "cpu" if device is None else resolve_device("--device", device)  # before any case is built
    ref_on = None if reference_device is None else resolve_device("--reference-device", reference_device)
    ref_on = None if ref_on == on else ref_on
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if algorithm is not None and algorithm not in ALGORITHMS:
        raise UsageError(f"unknown --algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    try:
        levels.level(level)  # before anything is loaded
    except ValueError as e:
        raise UsageError(str(e)) from None
    cand = _subject(candidate, algorithm, "--candidate")
    if reference is None:
        if cand.algorithm is None:
            raise UsageError(f"cannot tell which torch.optim class {cand.label} corresponds to: pass --reference "
                             f"MODULE:NAME, or --algorithm with one of {', '.join(ALGORITHMS)}")
        ref = default_reference(cand)
    else:
        ref = _subject(reference, algorithm or cand.algorithm, "--reference")
    algo = cand.algorithm or ref.algorithm
    if algo is None and reference is not None and cases is None:
        # An algorithm torch.optim lacks: the generic matrix from both signatures.
        try:
            cases = generic_cases(cand.obj, ref.obj, paths=paths or ("default",),
                                  dtypes=dtypes or matrix.DTYPES, param_sets=param_sets or GENERIC_PARAM_SETS,
                                  steps=steps, hyper=run_options.get("hyper"))
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from e
        algo = cases[0].algorithm if cases else ref.label
    if algo is None:
        raise UsageError(f"cannot tell which algorithm {cand.label} implements: pass --algorithm with one of "
                         f"{', '.join(ALGORITHMS)}")
    cand.algorithm = cand.algorithm or algo
    if cases is None:
        cases = levels.select(level, algo, paths=paths, dtypes=dtypes, param_sets=param_sets, steps=steps,
                              device=on, reference_device=ref_on)
    elif device is not None or ref_on is not None:
        cases = [dataclasses.replace(c, device=on, reference_device=ref_on) for c in cases]  # seeds kept
    notes = []
    if run_options.get("hyper"):
        cases, notes = pinned(cases, run_options["hyper"])
    if case_filter:
        cases = [c for c in cases if runner.matches_filter(c.id, case_filter)]
        if not cases:
            raise NoCases(f"no case id matches --filter {case_filter!r}")
    if not cases:
        raise NoCases(_no_cases(algo, paths, dtypes, param_sets, (on,) if ref_on is None else (on, ref_on)))
    for where in sorted({d for c in cases for d in (c.device, c.reference_device) if d not in (None, "cpu", on)}):
        resolve_device("case device", where)  # cases given with a device of their own
    return Plan(cand, ref, list(cases), run_options, notes)


def pinned(cases: list, hyper: dict) -> tuple[list, list[str]]:
    """The cases with --hyper's values in their configurations (so ids say what runs; seeds kept),
    and the configurations it makes identical dropped, said so in the returned notes."""
    out, seen, dropped = [], {}, collections.Counter()
    for case in cases:
        config = {**case.config, **hyper}
        moved = dataclasses.replace(case, config=config, second_group=dict(case.second_group))
        moved.seed = case.seed
        key = re.sub(r"/c\d+\[", "/c[", moved.id)
        if key in seen:
            dropped[(seen[key], case.config_index)] += 1
            continue
        seen[key] = case.config_index
        out.append(moved)
    notes = [f"--hyper {', '.join(f'{k}={v!r}' for k, v in hyper.items())} makes configuration c{b} the same as "
             f"c{a}: its {n} cases not run twice" for (a, b), n in sorted(dropped.items())]
    return out, notes


def _check_run_options(run_options: dict) -> None:
    known = set(RunOptions.__dataclass_fields__)
    unknown = sorted(set(run_options) - known)
    if unknown:
        raise TypeError(f"check() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"run options are {', '.join(sorted(known))}")
    hyper = run_options.get("hyper") or {}
    if not isinstance(hyper, dict) or not all(isinstance(k, str) for k in hyper):
        raise UsageError(f"hyper must map hyperparameter names to values, got {hyper!r}")
    max_ulp = run_options.get("max_ulp")
    if max_ulp is not None and (not isinstance(max_ulp, int) or max_ulp < 0):
        raise UsageError(f"--max-ulp must be a non-negative integer, got {max_ulp!r}")


def check(candidate: Any, reference: Any = None, *, algorithm: str | None = None, level: str = "default",
          paths=None, dtypes=None, param_sets=None, steps: int | None = None,
          cases: list[matrix.Case] | None = None, fail_fast: bool = False, threads: int | None = 1,
          workers: int = 1, timeout: float | None = None,
          progress: Callable[[CaseResult], None] | None = None, hyper: dict | None = None,
          numerics_only: bool = False, case_filter: str | None = None, max_ulp: int | None = None,
          kind: str | None = None, world_sizes=None, backend: str | None = None,
          **run_options) -> CheckReport:
    """Compare `candidate` with `reference` (default: torch.optim's class of the same name).

    candidate / reference: "module:Name" (or "module.Name") strings or the objects themselves —
    a torch.optim-style class, a functional class with step(gradients), or a functional kernel.
    level: "quick", "default" or "full" (harness/levels.py); paths / dtypes / param_sets / steps
    narrow or replace the level's choice. threads: torch intra-op threads while checking (None
    leaves the setting alone); one by default: the tensors are small, and torch's OpenMP kernels
    slow down tenfold when their threads compete for cores. workers > 1 runs cases in that many
    forked processes; timeout (seconds per case) runs them in watched processes, a hung case is
    reported as hung and its worker replaced. Results come back in case order either way.
    hyper: hyperparameters pinned on both sides (over every configuration); numerics_only: API/layout
    differences are reported but do not fail, and state dicts are not cross-loaded; case_filter: a
    substring or regular expression over case ids; max_ulp: numeric differences of at most that many
    ULPs (no NaN/inf mismatch) pass as "within tolerance" (default: bit for bit).
    kind / world_sizes / backend: a distributed optimizer over that many ranks (kind "zero",
    "local-sgd", "fsdp", "fsdp1", "adapter"; harness/distributed/, docs/distributed-check.md).
    """
    if kind is not None or world_sizes is not None or backend is not None:
        from optparity.harness.distributed.engine import check as distributed_check

        return distributed_check(candidate, reference, kind=kind, world_sizes=world_sizes, backend=backend,
                                 algorithm=algorithm, level=level, paths=paths, dtypes=dtypes,
                                 param_sets=param_sets, steps=steps, fail_fast=fail_fast, timeout=timeout,
                                 progress=progress, hyper=hyper, numerics_only=numerics_only,
                                 case_filter=case_filter, max_ulp=max_ulp, **run_options)
    plan = prepare(candidate, reference, algorithm=algorithm, level=level, paths=paths, dtypes=dtypes,
                   param_sets=param_sets, steps=steps, cases=cases, case_filter=case_filter,
                   hyper=dict(hyper or {}), numerics_only=numerics_only, max_ulp=max_ulp, **run_options)
    return run(plan, fail_fast=fail_fast, threads=threads, workers=workers, timeout=timeout, progress=progress)


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _fails(result: CaseResult) -> bool:
    return result.status == "fail"  # differs, errs on one side or hung (runner.CaseResult.status)


def run(plan: Plan, *, fail_fast: bool = False, threads: int | None = 1, workers: int = 1,
        timeout: float | None = None, progress: Callable[[CaseResult], None] | None = None,
        report: CheckReport | None = None) -> CheckReport:
    """Run a prepared plan. `report` (from plan.new_report()) is filled as results come in, so a
    caller can write it out mid-run. Ctrl-C: the report is marked interrupted and KeyboardInterrupt
    propagates, once every worker is gone."""
    report = plan.new_report() if report is None else report
    timeout = timeout or None
    pooled = workers > 1 or timeout is not None
    if pooled and "fork" not in multiprocessing.get_all_start_methods():
        warnings.warn("worker processes and --timeout need the fork start method; running in this process", stacklevel=2)
        pooled, timeout = False, None
    if pooled and _multithreaded(plan, threads) and not _forked_openmp_works():
        warnings.warn("this process already ran torch's multi-threaded (OpenMP) kernels, and a process forked "
                      "after that hangs in them: running the cases here, without workers or --timeout "
                      "(the optparity command never hits this)", stacklevel=2)
        pooled, timeout = False, None
    if pooled and _cuda_initialised() and any(_uses_cuda(c) for c in plan.cases):
        warnings.warn("CUDA is already initialised in this process, and a forked process cannot use it: running "
                      "the cases here, without workers or --timeout (the optparity command does not initialise it first)",
                      stacklevel=2)
        pooled, timeout = False, None
    with report.running():
        if pooled:
            _run_pool(plan, report, max(1, workers), threads, timeout, fail_fast, progress)
        else:
            _run_inline(plan, report, threads, fail_fast, progress)
    return report


def _uses_cuda(case) -> bool:
    devices = (getattr(case, "device", "cpu"), getattr(case, "reference_device", None))
    return any(matrix.device_type(d) == "cuda" for d in devices)


def _cuda_initialised() -> bool:
    return torch.cuda.is_initialized()


def _multithreaded(plan: Plan, threads: int | None) -> bool:
    """Some case runs torch kernels on more than one thread."""
    per_worker = torch.get_num_threads() if threads is None else threads
    return per_worker > 1 or any(getattr(c, "threads", 1) > 1 for c in plan.cases)


def _openmp_probe() -> None:
    torch.set_num_threads(2)
    torch.ones(1 << 17).add_(1).sum()  # above torch's grain size: a real parallel region


_OPENMP_FORK_BROKEN = False  # once it is, it stays so for the life of this process


def _forked_openmp_works(wait_s: float = 5.0) -> bool:
    """Whether a forked child can run a parallel region. GNU OpenMP's thread pool does not survive
    fork: once the parent has run one, the child hangs in its first. Tried, not guessed."""
    global _OPENMP_FORK_BROKEN
    if _OPENMP_FORK_BROKEN:
        return False
    probe = multiprocessing.get_context("fork").Process(target=_openmp_probe, daemon=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    probe.start()
    probe.join(wait_s)
    if probe.is_alive():
        probe.kill()
        probe.join()
    _OPENMP_FORK_BROKEN = probe.exitcode != 0
    return not _OPENMP_FORK_BROKEN


def _run_inline(plan, report, threads, fail_fast, progress) -> None:
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for index, case in enumerate(plan.cases):
            result = run_case(case, plan.candidate, plan.reference, **plan.run_options)
            report.add(index, result)
            if progress:
                progress(result)
            if fail_fast and _fails(result):
                break
    finally:
        torch.set_num_threads(previous_threads)


# --- worker processes -------------------------------------------------------------------------

_PLAN: Plan | None = None  # set before forking: workers inherit it


def _die_with_parent(parent_pid: int) -> None:
    """A parent killed with SIGKILL runs no cleanup: take its workers down too (Linux), or a hung
    candidate would spin on forever."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl
        os._exit(1)


def _worker_main(conn, step, threads, parent_pid) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (the CLI's clean stop)
    if threads is not None:
        torch.set_num_threads(threads)
    runner.STEP_MONITOR = step
    plan = _PLAN
    while True:
        try:
            index = conn.recv()
        except EOFError:
            return
        if index is None:
            return
        try:
            message = (index, "ok", run_case(plan.cases[index], plan.candidate, plan.reference, **plan.run_options))
        except Exception:  # noqa: BLE001 - a harness bug: the parent re-raises it with this traceback
            message = (index, "error", traceback.format_exc())
        try:
            conn.send(message)
        except OSError:  # the parent is gone
            return
        except Exception:  # noqa: BLE001 - e.g. a result holding something unpicklable
            conn.send((index, "error", "the case's result could not be sent back:\n" + traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, threads):
        self.step = ctx.RawValue("i", 0)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.step, threads, os.getpid()), daemon=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write the parent's buffered output again at exit
        # Ctrl-C goes to the whole process group: only the parent handles it. Workers are forked
        # with SIGINT ignored, so none can die of it between the fork and its first instruction.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.proc.start()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        child.close()
        self.index: int | None = None
        self.started = 0.0

    def give(self, index: int | None) -> None:
        self.index, self.started = index, time.monotonic()
        if index is not None:
            self.step.value = 0
            self.conn.send(index)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()
        self.index = None

    def stop(self) -> None:
        if self.conn.closed:
            return
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


def _crashed(case, step: int, exitcode: int | None, seconds: float) -> CaseResult:
    """A worker that died under a case (a segfault in a candidate's extension, the OOM killer)."""
    how = (f"killed by signal {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
           else f"exit code {exitcode}")
    where = f"step {step}" if step else "construction"
    return CaseResult(case, Verdict.ERROR_ONE_SIDE, steps_run=max(step - 1, 0), seconds=seconds,
                      message=f"the worker process running this case died in {where} ({how})")


def _run_pool(plan, report, n, threads, timeout, fail_fast, progress) -> None:
    global _PLAN
    ctx = multiprocessing.get_context("fork")
    cases = plan.cases
    _PLAN = plan
    workers: list[_Worker] = []
    # Edge-axis cases (large tensors, long runs) are the slow ones: handing them out first keeps
    # one of them from running alone at the end. Cases on several threads come last and run one
    # at a time: beside another worker their threads would outnumber the cores, and each parallel
    # region then waits for a descheduled thread (ten times slower on 2 cores). Results still go
    # in case order.
    solo = {i for i, c in enumerate(cases) if getattr(c, "threads", 1) > 1}
    queue = collections.deque(sorted(range(len(cases)),
                                     key=lambda i: (i in solo, levels.axis_of(cases[i]) == "base", i)))
    stop_at: int | None = None  # fail_fast: the first failing case seen so far

    def feed(w: _Worker) -> None:
        # With fail_fast, every case before the first failing one still runs, so the report is
        # the one a single in-process run gives.
        while queue:
            if queue[0] in solo and any(o.index is not None for o in workers if o is not w):
                break  # it waits until every other worker is idle
            index = queue.popleft()
            if stop_at is None or index < stop_at:
                w.give(index)
                return
        w.give(None)

    def deliver(index: int, result: CaseResult) -> None:
        nonlocal stop_at
        if stop_at is not None and index > stop_at:
            return
        result.case = cases[index]
        report.add(index, result)
        if progress:
            progress(result)
        if fail_fast and _fails(result):
            stop_at = index if stop_at is None else min(stop_at, index)

    import torch._dynamo  # noqa: F401 - torch.optim imports it at the first step: once here, not once per worker
    try:
        workers = [_Worker(ctx, threads) for _ in range(min(n, len(cases)))]
        for w in workers:
            feed(w)
        while True:
            busy = [w for w in workers if w.index is not None]
            if not busy:
                break
            wait_s = None
            if timeout is not None:
                wait_s = max(0.0, min(w.started for w in busy) + timeout - time.monotonic())
            ready = connection.wait([w.conn for w in busy], timeout=wait_s)
            for i, w in enumerate(workers):
                if w.index is None:
                    continue
                index = w.index
                if w.conn in ready:
                    try:
                        got, kind, payload = w.conn.recv()
                    except (EOFError, OSError):
                        w.proc.join()
                        result = _crashed(cases[index], w.step.value, w.proc.exitcode, time.monotonic() - w.started)
                        w.conn.close()
                        w = workers[i] = _Worker(ctx, threads)
                    else:
                        if kind == "error":
                            raise RuntimeError(f"the harness failed on case {cases[got].id}:\n{payload}")
                        result = payload
                    deliver(index, result)
                elif timeout is not None and time.monotonic() - w.started >= timeout:
                    step = w.step.value
                    w.kill()
                    deliver(index, CaseResult.hung_in(cases[index], step, timeout))
                    w = workers[i] = _Worker(ctx, threads)
                else:
                    continue
                feed(w)
            for w in workers:  # idle ones waiting for a one-at-a-time case to end
                if w.index is None and queue:
                    feed(w)
            if stop_at is not None:
                for i, w in enumerate(workers):
                    if w.index is not None and w.index > stop_at:  # a later case, not needed
                        w.kill()
                        if any(index < stop_at for index in queue):
                            workers[i] = _Worker(ctx, threads)
                            feed(workers[i])
        if stop_at is not None:
            report.truncate(stop_at)
    except BaseException:
        for w in workers:
            if w.proc.is_alive():
                w.proc.kill()
        for w in workers:
            w.proc.join()
        raise
    else:
        for w in workers:
            w.stop()
    finally:
        _PLAN = None
