"""Run one case: candidate and reference side by side on identical copies, compared bit for bit
after every step (parameters, every state tensor, state-dict hyperparameters), and classify it.

Every case ends in one verdict (class Verdict). Differences are recorded by cause: numeric ones
(a parameter, state or gradient tensor whose values differ) and API/layout ones (state keys,
param-group keys, state_dict structure, a setting, a closure's return value); the first of each
is kept, so an early layout difference never hides the numeric one behind it."""
from __future__ import annotations

import contextlib
import math
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from optparity.harness import algorithms, amp, bitwise, conditions, objectives, observers, schedulers, shadow as shadows
from optparity.harness.bitwise import Difference, compare, max_ulp
from optparity.harness.candidates import (NotApplicable, algorithm_of, kind_of, load_object, make_driver,
                                          options_not_accepted)
from optparity.harness.matrix import CROSS_LOAD, LR_CHANGE, RELOAD_OWN, ROLLBACKS, Case
from optparity.harness.params import make_grads, make_params, to_device


class Verdict:
    """The class every case ends in."""

    BIT_IDENTICAL = "bit_identical"
    WITHIN_TOLERANCE = "within_tolerance"  # only with max_ulp: numbers differ by at most that many ULPs
    NUMERICS_DIFFER = "numerics_differ"
    API_DIFFERS = "api_differs"  # layout only (state keys, param-group keys, state_dict); numbers identical
    NOT_APPLICABLE = "not_applicable"  # the candidate does not accept an option of this case
    SAME_ERROR = "same_error"  # both sides raised the same error
    ERROR_ONE_SIDE = "error_one_side"  # one side raised (or the two raised different errors)
    HUNG = "hung"  # timed out (set by the engine, harness/check.py)
    # the reference ran on another device (Case.reference_device): distances measured, not claimed zero
    MEASURED_ACROSS_DEVICES = "measured_across_devices"

    ALL = (BIT_IDENTICAL, WITHIN_TOLERANCE, NUMERICS_DIFFER, API_DIFFERS, NOT_APPLICABLE, SAME_ERROR,
           ERROR_ONE_SIDE, HUNG, MEASURED_ACROSS_DEVICES)
    LABELS = {BIT_IDENTICAL: "bit-identical", WITHIN_TOLERANCE: "within tolerance",
              NUMERICS_DIFFER: "numerics differ", API_DIFFERS: "API/layout differs only",
              NOT_APPLICABLE: "not applicable", SAME_ERROR: "same error on both sides",
              ERROR_ONE_SIDE: "error on one side", HUNG: "hung",
              MEASURED_ACROSS_DEVICES: "measured across devices"}


ROUNDING, DIFFERENT_MATH = "rounding-level", "different math"


@dataclass
class RunOptions:
    """What is compared and how strictly (check(hyper=, numerics_only=, max_ulp=, rounding_ulp=))."""

    hyper: dict = field(default_factory=dict)  # pinned hyperparameters, given to both sides
    numerics_only: bool = False  # API/layout differences are reported but do not fail
    max_ulp: int | None = None  # tolerance mode: numeric differences up to this many ULPs pass
    rounding_ulp: int = 8  # rounding-level bound: ULPs at the first differing step, and growth per step


@dataclass
class Subject:
    """An optimizer under test (or the reference): the object, its kind and its algorithm."""

    obj: Any
    kind: str
    algorithm: str | None
    label: str

    @classmethod
    def of(cls, spec_or_obj: Any, algorithm: str | None = None) -> "Subject":
        obj = load_object(spec_or_obj) if isinstance(spec_or_obj, str) else spec_or_obj
        label = spec_or_obj if isinstance(spec_or_obj, str) else getattr(obj, "__qualname__", repr(obj))
        return cls(obj, kind_of(obj), algorithm or algorithm_of(obj), label)


@dataclass
class Divergence:
    step: int
    where: str  # numeric: "param", "state", "grad"; API: "state", "state_dict", "closure", ...; "error"
    param: str | None
    key: str | None
    difference: Difference | None
    message: str
    rank: int | None = None  # distributed checks (harness/distributed): the rank that saw it
    world_size: int | None = None

    @property
    def numeric(self) -> bool:
        return self.difference is not None and self.difference.numeric

    def as_dict(self) -> dict:
        d = {"step": self.step, "where": self.where, "param": self.param, "key": self.key, "message": self.message,
             "numeric": self.numeric}
        if self.rank is not None:
            d.update(rank=self.rank, world_size=self.world_size)
        if self.difference is not None:
            diff = self.difference
            d.update(element=list(diff.index) if diff.index is not None else None,
                     candidate=_jsonable(diff.candidate), reference=_jsonable(diff.reference),
                     abs_error=diff.abs_error, ulp=diff.ulp, kind=diff.kind, max_ulp=diff.max_ulp,
                     max_abs_error=diff.max_abs_error, max_rel_error=diff.max_rel_error,
                     worst_element=list(diff.worst_index) if diff.worst_index is not None else None)
        return d

    def describe(self) -> str:
        where = self.where + (f" {self.param}" if self.param else "") + (f"[{self.key!r}]" if self.key else "")
        on = f", rank {self.rank} of world size {self.world_size}" if self.rank is not None else ""
        return f"step {self.step}{on}, {where}: {self.message}"


def _jsonable(v):
    if isinstance(v, complex):
        return [v.real, v.imag]
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class CaseResult:
    case: Case
    verdict: str = Verdict.BIT_IDENTICAL
    steps_run: int = 0
    divergence: Divergence | None = None  # the one the verdict rests on
    first_numeric: Divergence | None = None
    first_api: Divergence | None = None
    error: Divergence | None = None  # the first error (one side, or the same on both)
    traceback: str = ""  # the candidate's own traceback for its first error
    worst_ulp: int = 0  # over every param and state tensor, every step, finite pairs
    worst: dict | None = None  # where that is: step, where, param, key, element
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    nan_mismatches: int = 0  # elements (summed over tensors and steps) where one side is NaN
    inf_mismatches: int = 0
    per_step: list[dict] = field(default_factory=list)  # numeric differences only: one row per step
    math: str | None = None  # numerics_differ: ROUNDING or DIFFERENT_MATH
    rejected_options: list[str] = field(default_factory=list)  # not_applicable: what was refused
    hung_step: int | None = None  # hung: the step it was in
    numerics_only: bool = False
    max_ulp: int | None = None  # the tolerance it ran under (None: bit for bit)
    fused_vs_forloop_ulp: int | None = None  # measured, informational: the candidate against torch's for-loop path
    shadow: dict | None = None  # numerics_differ: the shadow verdict the math rests on (harness/shadow.py)
    reference_suspect: str = ""  # torch's path is known wrong or nondeterministic here (shadow.suspect_note)
    layout: str = ""  # the two state dicts' layouts differ (what each lacks); then each side reloaded its own
    message: str = ""
    seconds: float = 0.0

    def __post_init__(self):
        # Older callers passed a status ("pass", "fail", "skip") where the verdict now goes.
        legacy = {"pass": Verdict.BIT_IDENTICAL, "skip": Verdict.NOT_APPLICABLE, "fail": Verdict.ERROR_ONE_SIDE}
        self.verdict = legacy.get(self.verdict, self.verdict)
        if self.verdict not in Verdict.ALL:
            raise ValueError(f"unknown verdict {self.verdict!r}; one of {', '.join(Verdict.ALL)}")

    @property
    def status(self) -> str:
        """"pass", "fail" or "skip" (what JUnit and older callers understand)."""
        if self.verdict == Verdict.NOT_APPLICABLE:
            return "skip"
        if self.verdict in (Verdict.NUMERICS_DIFFER, Verdict.ERROR_ONE_SIDE, Verdict.HUNG):
            return "fail"
        if self.verdict == Verdict.API_DIFFERS and not self.numerics_only:
            return "fail"
        return "pass"

    @property
    def numbers_match(self) -> bool:
        """The case ran and its numbers are torch's (bit for bit, or within the explicit tolerance)."""
        return self.verdict in (Verdict.BIT_IDENTICAL, Verdict.WITHIN_TOLERANCE, Verdict.MEASURED_ACROSS_DEVICES) or (
            self.verdict == Verdict.API_DIFFERS and self.numerics_only)

    @classmethod
    def hung_in(cls, case: Case, step: int, timeout_s: float, seconds: float | None = None) -> "CaseResult":
        """The result of a case killed after `timeout_s` while in `step` (0: constructing)."""
        where = f"step {step}" if step else "construction"
        return cls(case, Verdict.HUNG, steps_run=max(step - 1, 0), hung_step=step,
                   message=f"hung in {where}: no result after {timeout_s:g} s",
                   seconds=timeout_s if seconds is None else seconds)


def report_ok(results: list[CaseResult]) -> bool:
    """No failing case, and at least one whose numbers match (same errors or skips alone prove nothing)."""
    return bool(results) and not any(r.status == "fail" for r in results) and any(r.numbers_match for r in results)


def matches_filter(case_id: str, pattern: str | None) -> bool:
    """A case filter is a substring of the case id or a regular expression searched in it."""
    if not pattern:
        return True
    if pattern in case_id:
        return True
    try:
        return re.search(pattern, case_id) is not None
    except re.error:
        return False


class _Tracker:
    """Every difference, sorted by cause: the first numeric one, the first API/layout one, the
    first error, the worst ULP distance and where it is, and per-step maxima of numeric errors.

    record(step, where, param, key, diff, message): a difference carrying a numeric Difference
    (a tensor's values) is numeric whatever `where` says; anything else is API/layout."""

    def __init__(self):
        self.first_numeric: Divergence | None = None
        self.first_api: Divergence | None = None
        self.error: Divergence | None = None
        self.error_one_side = False
        self.traceback = ""
        self.worst_ulp = 0
        self.worst: dict | None = None
        self.max_abs = self.max_rel = 0.0
        self.nan = self.inf = 0
        self.per_step: dict[int, dict] = {}
        self.numeric_where: set[str] = set()  # where numeric differences were seen ("param", "state", ...)
        self.layout = ""  # the state-dict layout finding (runner.layout_difference), if any

    def record(self, step, where, param, key, diff: Difference | None = None, message: str = ""):
        div = Divergence(step, where, param, key, diff, message or (diff.describe() if diff else ""))
        if not div.numeric:
            self.first_api = self.first_api or div
            if where == "state_dict" and key == "layout":
                self.layout = self.layout or message
            return
        self.first_numeric = self.first_numeric or div
        self.numeric_where.add(where)
        row = self.per_step.setdefault(step, dict(_EMPTY_STEP))
        row["nan_inf"] += diff.nan_mismatches + diff.inf_mismatches
        self.nan += diff.nan_mismatches
        self.inf += diff.inf_mismatches
        if diff.max_ulp is not None:
            row["max_ulp"] = max(row["max_ulp"], diff.max_ulp)
            row["max_rel_error"] = max(row["max_rel_error"], diff.max_rel_error)
            row["scaled_error"] = max(row["scaled_error"], diff.scaled_error)
            if diff.max_ulp > self.worst_ulp:
                self.worst_ulp = diff.max_ulp
                self.worst = {"step": step, "where": where, "param": param, "key": key,
                              "element": list(diff.worst_index), "ulp": diff.max_ulp}
            self.max_rel = max(self.max_rel, diff.max_rel_error)
        if diff.max_abs_error is not None:
            row["max_abs_error"] = max(row["max_abs_error"], diff.max_abs_error)
            self.max_abs = max(self.max_abs, diff.max_abs_error)

    def errors(self, step: int, e_cand: BaseException | None, e_ref: BaseException | None) -> None:
        if self.error is not None:
            return
        if e_cand is not None and e_ref is not None and type(e_cand) is type(e_ref) and str(e_cand) == str(e_ref):
            self.error = Divergence(step, "error", None, None, None, f"both raised {_error_text(e_cand)}")
        else:
            cand = _error_text(e_cand) if e_cand else "no error"
            ref = _error_text(e_ref) if e_ref else "no error"
            self.error = Divergence(step, "error", None, None, None,
                                    f"candidate: {cand}{_hint(e_cand)} | reference: {ref}")
            self.error_one_side = True
        if e_cand is not None:
            self.traceback = "".join(traceback.format_exception(e_cand))[-6000:]


_EMPTY_STEP = {"max_ulp": 0, "max_rel_error": 0.0, "max_abs_error": 0.0, "scaled_error": 0.0, "nan_inf": 0}


def _hint(e: BaseException | None) -> str:
    if isinstance(e, TypeError) and (m := re.search(r"missing \d+ required .*?argument[s]?: '(\w+)'", str(e))):
        return f" (pin it: --hyper {m.group(1)}=VALUE)"
    return ""


def _unexpected_keyword(e: BaseException | None) -> str | None:
    if isinstance(e, TypeError) and (m := re.search(r"unexpected keyword argument '(\w+)'", str(e))):
        return m.group(1)
    return None


def _compare_value(a: Any, b: Any) -> Difference | None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return compare(a, b)
    if isinstance(a, list) and type(b) is list and len(a) == len(b):
        # element by element first: `!=` on lists of tensors (LBFGS's history) would raise
        return next((d for d in map(_compare_value, a, b) if d is not None), None)
    if type(a) is float and type(b) is float:
        # Python floats (LBFGS's prev_loss) by the same rule as tensors: NaN matches NaN, -0.0 is not 0.0
        same = (a != a and b != b) or (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))
        return None if same else Difference("value", candidate=repr(a), reference=repr(b))
    if type(a) is not type(b) or a != b:
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b) and type(a) is type(b):
            for x, y in zip(a, b):
                d = _compare_value(x, y)
                if d is not None:
                    return d
            return None
        return Difference("value" if type(a) is type(b) else "type", candidate=repr(a), reference=repr(b))
    return None


def _compare_drivers(tracker: _Tracker, step: int, cand, ref, names: list[str]) -> None:
    for i, (pc, pr) in enumerate(zip(cand.pset.params, ref.pset.params)):
        diff = compare(pc, pr)
        if diff is not None:
            tracker.record(step, "param", names[i], None, diff)
    sc, sr = cand.state(), ref.state()
    for i in sorted(set(sc) | set(sr)):
        if i not in sc or i not in sr:
            who = "candidate" if i in sc else "reference"
            tracker.record(step, "state", names[i], None, None, f"only the {who} has state for this parameter")
            continue
        keys_c, keys_r = set(sc[i]), set(sr[i])
        if keys_c != keys_r:
            tracker.record(step, "state", names[i], None, None,
                           f"state keys differ: candidate {sorted(keys_c)}, reference {sorted(keys_r)}")
        for key in sorted(keys_c & keys_r):
            diff = _compare_value(sc[i][key], sr[i][key])
            if diff is not None:
                tracker.record(step, "state", names[i], key, diff)


def _compare_param_groups(tracker: _Tracker, step: int, sd_c: dict, sd_r: dict) -> None:
    n_c, n_r = len(sd_c["param_groups"]), len(sd_r["param_groups"])
    if n_c != n_r:
        tracker.record(step, "state_dict", None, "param_groups", None,
                       f"{n_c} param groups in the candidate's state_dict, {n_r} in the reference's")
    for g, (gc, gr) in enumerate(zip(sd_c["param_groups"], sd_r["param_groups"])):
        for key in sorted(set(gc) | set(gr)):
            if key not in gc or key not in gr:
                tracker.record(step, "state_dict", f"group{g}", key, None,
                               f"param_groups[{g}] key {key!r} only in the {'candidate' if key in gc else 'reference'}")
            else:
                diff = _compare_value(gc[key], gr[key])
                if diff is not None:
                    tracker.record(step, "state_dict", f"group{g}", key, diff)


def _clone(grads: list[Tensor | None], device: str | None = None) -> list[Tensor | None]:
    """Copies of `grads`; on `device` (same layout, same bits) when one is given."""
    if device is not None:
        moved = [None if g is None else to_device(g, device) for g in grads]
        return [g.clone() if g is not None and g is orig else g for g, orig in zip(moved, grads)]
    return [None if g is None else g.clone() for g in grads]


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _attempt(fn):
    try:
        return fn(), None
    except NotApplicable:
        raise
    except Exception as e:  # noqa: BLE001 - any error is a fact to compare with the reference's
        return None, e


def _same_error(tracker: _Tracker, step: int, e_cand, e_ref) -> bool:
    """Record errors; True when the case must stop (either side raised)."""
    if e_cand is None and e_ref is None:
        return False
    tracker.errors(step, e_cand, e_ref)
    return True


# Set by an engine that watches for hangs (harness/check.py's workers): an object with a `value`
# attribute, set to the step each case is in (0: constructing the optimizers).
STEP_MONITOR = None


def run_case(case: Case, candidate: Subject, reference: Subject, options: RunOptions | None = None,
             on_step: Callable[[int], None] | None = None, **option_kwargs) -> CaseResult:
    """One case, classified. options: a RunOptions, or its fields as keywords (hyper=,
    numerics_only=, max_ulp=, rounding_ulp=). on_step(n) is called as step n starts (0:
    construction), as is STEP_MONITOR.value set, so an engine that kills a hung case can say where."""
    options = options or RunOptions(**option_kwargs)
    start = time.perf_counter()
    result = CaseResult(case, numerics_only=options.numerics_only, max_ulp=options.max_ulp)
    monitor = STEP_MONITOR

    def stepping(n: int) -> None:
        if monitor is not None:
            monitor.value = n
        if on_step is not None:
            on_step(n)

    placement = bitwise.across_devices if getattr(case, "across_devices", False) else contextlib.nullcontext
    try:
        with conditions.applied(case), placement():  # the case's threads and default dtype (edge axes)
            _run(case, candidate, reference, result, options, stepping)
    except NotApplicable as e:
        result.verdict, result.message = Verdict.NOT_APPLICABLE, str(e)
        result.rejected_options = list(e.options)
    if result.verdict in (Verdict.NUMERICS_DIFFER, Verdict.WITHIN_TOLERANCE) and not getattr(case, "across_devices", False):
        # Differing numbers: run the case again beside the higher-precision shadow, which says
        # whether they differ as rounding does (harness/shadow.py). Only differing cases pay for it.
        again = CaseResult(case, numerics_only=options.numerics_only, max_ulp=options.max_ulp)
        with conditions.applied(case), placement():
            _run(case, candidate, reference, again, options, stepping, with_shadow=True)
        if again.verdict == result.verdict and again.worst_ulp == result.worst_ulp:
            again.fused_vs_forloop_ulp = result.fused_vs_forloop_ulp
            result = again
        else:  # candidate or reference not deterministic: the first run's figures, the shadow's math
            result.shadow, result.math = again.shadow, again.math
            result.message += "; a second run gave other numbers (not deterministic)"
    result.seconds = time.perf_counter() - start
    return result


def _new_pset(case: Case, device: str | None = None):
    """The case's parameter set on `device` (default: the reference's device)."""
    device = device or getattr(case, "reference_device", None) or getattr(case, "device", "cpu")
    return make_params(case.param_set, case.dtype, case.seed, case.second_group,
                       differentiable=bool(case.config.get("differentiable")), device=device)


def _start_shadow(case: Case, reference: Subject, algo: str, options: RunOptions):
    """(the case's shadow, or None, why not): the reference in float64 (and float32 for float64
    tensors) over the case's parameters, on its for-loop path."""
    hyper = {**case.config, **options.hyper}
    if not options_not_accepted(reference.obj, reference.kind, {"foreach": False}) and "foreach" in _signature(reference):
        hyper["foreach"] = False
    try:
        probe = _new_pset(case)
        wide = any(p.dtype in (torch.float64, torch.complex128) for p in probe.params)
        made = shadows.Shadow(lambda pset, h: make_driver(reference.obj, reference.kind, algo, pset, h),
                              lambda: _new_pset(case), hyper, wide)
    except Exception as e:  # noqa: BLE001 - the reference cannot run in float64: no shadow, said so
        return None, f"no shadow: the reference in float64 raised {_error_text(e)}"
    return made, ""


def _signature(subject: Subject) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(subject.obj).parameters)
    except (TypeError, ValueError):
        return set()


def _run(case: Case, candidate: Subject, reference: Subject, result: CaseResult, options: RunOptions,
         on_step: Callable[[int], None], with_shadow: bool = False) -> None:
    algo = case.algorithm
    hyper = {**case.config, **options.hyper, **case.path_kwargs()}
    tracker = _Tracker()
    on_step(0)
    lacking = options_not_accepted(candidate.obj, candidate.kind, hyper)
    if lacking:
        raise NotApplicable(f"{candidate.label} takes no {', '.join(lacking)}", lacking)
    pset_c, pset_r = _new_pset(case, getattr(case, "device", "cpu")), _new_pset(case)
    # grads are drawn for the reference's parameters: the candidate's copies go to its own device
    to_candidate = pset_c.device if pset_c.device != pset_r.device else None
    names = pset_r.names
    ref, e_ref = _attempt(lambda: make_driver(reference.obj, reference.kind, algo, pset_r, hyper))
    cand, e_cand = _attempt(lambda: make_driver(candidate.obj, candidate.kind, algo, pset_c, hyper))
    rejected = _unexpected_keyword(e_cand)
    if rejected and e_ref is None and rejected in hyper:
        raise NotApplicable(f"{candidate.label} does not accept {rejected}= ({_error_text(e_cand)})", [rejected])
    forloop = None
    if case.path == "fused" and e_ref is None:
        # fused kernels are not bit-equal to the for-loop path by design: measure how far they are.
        forloop, _ = _attempt(lambda: make_driver(reference.obj, reference.kind, algo, _new_pset(case),
                                                  {**case.config, **options.hyper, "foreach": False}))
        result.fused_vs_forloop_ulp = 0
    result.reference_suspect = shadows.suspect_note(case, reference.label, pset_r.params)
    shadow, no_shadow = _start_shadow(case, reference, algo, options) if with_shadow and e_ref is None else (None, "")
    # torch's error against the shadow: its for-loop path's where the reference itself is the suspect
    noise_ref = forloop if result.reference_suspect and forloop is not None else ref
    stop = _same_error(tracker, 0, e_cand, e_ref)
    # .grad, zero_grad, hooks and load_state_dict's argument are compared too (harness/observers.py)
    observer = observers.Observer(tracker, cand, ref, names) if cand is not None and ref is not None else None
    scheduled = bool(case.scheduler) and observer is not None and observer.active
    if scheduled:  # the same LR scheduler steps both (harness/schedulers.py)
        schedulers.attach(case, cand, ref, *(d for d in (forloop, *(shadow.drivers if shadow else ())) if d is not None))
    differentiable = bool(case.config.get("differentiable"))
    reloadable = (not differentiable and getattr(cand, "supports_state_dict", False)
                  and getattr(ref, "supports_state_dict", False))
    # lr changes and closure losses only make sense between torch.optim-style optimizers.
    drivers = [d for d in (cand, ref, forloop, *(shadow.drivers if shadow else ())) if d is not None]
    param_groups = all(getattr(d, "supports_param_groups", False) for d in drivers)
    amp.attach(case, *drivers)  # the AMP recipes' second optimizer (harness/amp.py)
    rollback = {} if reloadable and getattr(case, "axis", "base") == "rollback" else None
    # torch's for-loop path and the shadow follow the two sides through every reload and rollback
    bystanders = [d for d in (forloop, *(shadow.drivers if shadow else ())) if d is not None]
    crossed = False  # the two sides have loaded each other's state
    step = 0
    while not stop and step < case.steps:
        if rollback is not None:
            _rollback(tracker, step, cand, ref, rollback)
            if not _rollback_own(step, bystanders, rollback) and shadow is not None and not shadow.failed:
                shadow.failed = f"the shadow could not load its own state back at step {step}"
        step += 1
        on_step(step)
        grads = make_grads(pset_r, case.seed, step)
        # the shadow's and the for-loop path's own copies first: the reference's zero_grad
        # (observers.py) zeroes `grads` in place
        shadow_grads = shadow.private_grads(grads) if shadow is not None and not shadow.failed else None
        forloop_grads = _clone(grads) if forloop is not None else None
        loss_r, e_ref = _attempt(lambda: conditions.step(case, ref, grads, step))
        loss_c, e_cand = _attempt(lambda: conditions.step(case, cand, _clone(grads, to_candidate), step))
        if _same_error(tracker, step, e_cand, e_ref):
            break
        if shadow_grads is not None:
            _step_shadow(case, shadow, shadow_grads, step)
        if param_groups:
            diff = _compare_value(loss_c, loss_r)
            if diff is not None:
                tracker.record(step, "closure", None, None, diff if diff.numeric else None,
                               f"step(closure) returned {loss_c!r}, the reference returned {loss_r!r}")
        calls = objectives.closure_calls_differ(cand, ref)
        if calls:
            tracker.record(step, "closure", None, None, None, calls)
        amp.check_skipped(tracker, step, cand, names)  # a step GradScaler skipped left all as it was
        _compare_drivers(tracker, step, cand, ref, names)
        if scheduled:
            _compare_param_groups(tracker, step, *schedulers.live_param_groups(cand, ref))
        if observer is not None:
            observer.after_step(step)
        if differentiable and step == 1:
            _compare_backward(tracker, step, pset_c, pset_r)
        forloop_ok = forloop is not None and _attempt(lambda: conditions.step(case, forloop, forloop_grads, step))[1] is None
        # after the cross-load the candidate carries a suspect reference's state: measured no further
        carries_suspect = bool(result.reference_suspect) and crossed
        if forloop_ok and not carries_suspect:
            for pc, pf in zip(cand.pset.params, forloop.pset.params):
                ulps = max_ulp(pc, pf)
                if ulps is not None:
                    result.fused_vs_forloop_ulp = max(result.fused_vs_forloop_ulp, ulps)
        if shadow is not None and not shadow.failed and not carries_suspect:
            if noise_ref is ref or forloop_ok:
                shadow.measure(step, cand, noise_ref, names)
        # own state_dict reloads: after RELOAD_OWN, and after every other step for reload="every_step"
        own_reload = step == RELOAD_OWN or (getattr(case, "reload", "standard") == "every_step" and step != CROSS_LOAD)
        if reloadable and (own_reload or step == CROSS_LOAD) and shadow is not None and not shadow.failed:
            _reload_shadow(shadow, step)  # as the two sides do: a reload casts state to the parameter's dtype
        if reloadable and (own_reload or step == CROSS_LOAD) and forloop_ok:
            _attempt(lambda: forloop.reload(forloop.state_dict()))
        if reloadable and own_reload:
            _reload(tracker, step, cand, ref, cross=False)
        if reloadable and step == CROSS_LOAD:
            # Loading each other's state_dict is a layout check: skipped when only numbers count.
            if options.numerics_only:
                _compare_param_groups_of(tracker, step, cand, ref)
            else:
                _reload(tracker, step, cand, ref, cross=True)
                crossed = tracker.crossed = True
        if step == LR_CHANGE and param_groups:
            for driver in drivers:
                driver.scale_lr(0.5)
    result.steps_run = step
    _classify(result, tracker, options)
    if with_shadow:
        if result.reference_suspect and crossed and shadow is not None:
            shadow.until = CROSS_LOAD
        _judge_by_shadow(result, tracker, shadow, no_shadow)


def _step_shadow(case: Case, shadow, grads: list, step: int) -> None:
    for driver, own in zip(shadow.drivers, grads):
        _, e = _attempt(lambda: conditions.step(case, driver, own, step))
        if e is not None:
            shadow.failed = f"the shadow stopped at step {step}: {_error_text(e)}"
            return


def _reload_shadow(shadow, step: int) -> None:
    for driver in shadow.drivers:
        _, e = _attempt(lambda: driver.reload(driver.state_dict()))
        if e is not None:
            shadow.failed = f"the shadow could not reload its own state at step {step}: {_error_text(e)}"
            return


def _judge_by_shadow(result: CaseResult, tracker: _Tracker, shadow, no_shadow: str) -> None:
    """The math of a differing case from its shadow (harness/shadow.py). Differences outside
    parameters and state (a closure's loss, a gradient through the step) keep the ULP-growth rule
    for their part; without a shadow the ULP-growth rule alone decides, and says so."""
    if result.verdict not in (Verdict.NUMERICS_DIFFER, Verdict.WITHIN_TOLERANCE):
        return
    if shadow is None or shadow.failed or not shadow.per_step:
        why = no_shadow or (shadow.failed if shadow is not None else "no shadow")
        result.shadow = {"math": None, "note": why or "no shadow"}
        result.message += f"; by ULP growth ({why})"
        return
    nan_inf = bool(tracker.nan or tracker.inf)
    basis = "torch's for-loop path stands in for the suspect reference" if result.reference_suspect else ""
    if getattr(shadow, "until", None):
        basis += (f", steps 1-{shadow.until} (after them the candidate carries the suspect reference's state, "
                  f"loaded at step {shadow.until})")
    verdict = shadow.verdict(nan_inf, ROUNDING, DIFFERENT_MATH, basis)
    others = tracker.numeric_where - {"param", "state"}
    if others:  # a closure's loss, a gradient through the step: no shadow of theirs, named instead
        verdict.note = "; ".join(n for n in (verdict.note, f"{', '.join(sorted(others))} also differ (not judged by "
                                                          f"the shadow)") if n)
    old = f"[{result.math}:"
    result.math, result.shadow = verdict.math, verdict.as_dict()
    result.message = result.message.replace(old, f"[{result.math}:", 1) + f"; vs shadow: {verdict.describe()}"


def _classify(result: CaseResult, tracker: _Tracker, options: RunOptions) -> None:
    result.first_numeric, result.first_api, result.error = tracker.first_numeric, tracker.first_api, tracker.error
    result.traceback = tracker.traceback
    result.worst_ulp, result.worst = tracker.worst_ulp, tracker.worst
    result.max_abs_error, result.max_rel_error = tracker.max_abs, tracker.max_rel
    result.nan_mismatches, result.inf_mismatches = tracker.nan, tracker.inf
    result.layout = tracker.layout
    if tracker.first_numeric is not None:
        result.per_step = [{"step": s, **tracker.per_step.get(s, _EMPTY_STEP)} for s in range(1, result.steps_run + 1)]
        result.math = math_verdict(result.per_step, options.rounding_ulp)
    across = getattr(result.case, "across_devices", False)
    numeric = tracker.first_numeric
    if across and numeric is not None and not _over_max_ulp(tracker, options.max_ulp):
        numeric = None  # a distance across devices is measured and reported, not a failure
    if tracker.error is not None and tracker.error_one_side:
        result.verdict, result.divergence = Verdict.ERROR_ONE_SIDE, tracker.error
    elif numeric is not None:
        within = (options.max_ulp is not None and not (tracker.nan or tracker.inf)
                  and tracker.worst_ulp <= options.max_ulp)
        result.verdict = Verdict.WITHIN_TOLERANCE if within else Verdict.NUMERICS_DIFFER
        result.divergence = tracker.first_numeric
    elif tracker.first_api is not None:
        result.verdict, result.divergence = Verdict.API_DIFFERS, tracker.first_api
    elif tracker.error is not None:
        result.verdict, result.divergence = Verdict.SAME_ERROR, tracker.error
    elif across:
        result.verdict, result.divergence = Verdict.MEASURED_ACROSS_DEVICES, tracker.first_numeric
    else:
        result.verdict = Verdict.BIT_IDENTICAL
    if result.divergence is not None:
        result.message = result.divergence.describe()
    if result.verdict in (Verdict.NUMERICS_DIFFER, Verdict.WITHIN_TOLERANCE):
        result.message += (f" [{result.math}: max {bitwise.readable_ulp(result.worst_ulp)} ulp, "
                           f"max rel err {bitwise.readable_rel(result.max_rel_error)}]")
    if across and result.verdict in (Verdict.MEASURED_ACROSS_DEVICES, Verdict.API_DIFFERS):
        distance = _distance_across_devices(result)
        result.message = distance + (f"; first difference: {result.message}" if result.message else "")
    if result.reference_suspect and result.verdict != Verdict.BIT_IDENTICAL:
        result.message += f"; reference suspect: {result.reference_suspect}"
        if result.fused_vs_forloop_ulp is not None:
            until = f" over steps 1-{CROSS_LOAD}" if getattr(tracker, "crossed", False) else ""
            result.message += (f" (the candidate is {result.fused_vs_forloop_ulp} ulp from torch's for-loop "
                               f"path{until})")
    if tracker.first_api is not None and result.verdict != Verdict.API_DIFFERS:
        result.message += f"; also API/layout: {tracker.first_api.describe()}"
    if tracker.layout and tracker.layout not in result.message:
        result.message += f"; {tracker.layout}"


def _over_max_ulp(tracker: _Tracker, limit: int | None) -> bool:
    """--max-ulp given and a numeric difference beyond it (a NaN/inf mismatch is beyond any)."""
    return limit is not None and bool(tracker.nan or tracker.inf or tracker.worst_ulp > limit)


def _distance_across_devices(result: CaseResult) -> str:
    """What a case compared across devices measured (bitwise.compare's measures, on the CPU)."""
    case = result.case
    text = (f"candidate on {case.device}, reference on {case.reference_device}, not claimed equal: "
            f"max {result.worst_ulp} ulp, max abs err {result.max_abs_error:.3g}, "
            f"max rel err {result.max_rel_error:.3g}")
    if result.nan_mismatches or result.inf_mismatches:
        text += f", {result.nan_mismatches} NaN vs number, {result.inf_mismatches} inf mismatch"
    return text


def math_verdict(per_step: list[dict], rounding_ulp: int = 8) -> str:
    """ROUNDING when the numbers drift apart as rounding does, DIFFERENT_MATH otherwise.

    The measure is each differing tensor's scaled error, max|c - r| / (eps * max|r|): its error in
    roundings (ULPs) of the tensor's own scale, so a small element born of cancellation (a momentum
    near zero) does not inflate it the way its own ULP count does. Rounding-level: no NaN or
    infinity mismatch at any step, a scaled error of at most `rounding_ulp` at the first differing
    step, and at most rounding_ulp * (k + 1) k steps later (growing linearly at worst)."""
    first = next((row["step"] for row in per_step if row["max_ulp"] or row["nan_inf"]), None)
    if first is None:  # differences that have no ULP measure (integer tensors, settings)
        return DIFFERENT_MATH
    for row in per_step:
        if row["nan_inf"]:
            return DIFFERENT_MATH
        if row["step"] >= first and row["scaled_error"] > rounding_ulp * (row["step"] - first + 1):
            return DIFFERENT_MATH
    return ROUNDING


def _compare_param_groups_of(tracker: _Tracker, step: int, cand, ref) -> None:
    sd_c, sd_r = _attempt(cand.state_dict), _attempt(ref.state_dict)
    if sd_c[1] is None and sd_r[1] is None:
        _compare_param_groups(tracker, step, sd_c[0], sd_r[0])


def _reload(tracker: _Tracker, step: int, cand, ref, cross: bool) -> None:
    sd_c, sd_r = _attempt(cand.state_dict), _attempt(ref.state_dict)
    if sd_c[1] or sd_r[1]:
        _same_error(tracker, step, sd_c[1], sd_r[1])
        return
    _compare_param_groups(tracker, step, sd_c[0], sd_r[0])
    layout = layout_difference(sd_c[0], sd_r[0]) if cross else ""
    if layout:
        # Each other's state dicts cannot mean the same: a layout finding, and each side goes on
        # from its own state, so the numbers are still compared.
        tracker.record(step, "state_dict", None, "layout", None,
                       f"state-dict layouts differ ({layout}): each side reloaded its own state instead of the other's")
        cross = False
    load_c, load_r = (sd_r[0], sd_c[0]) if cross else (sd_c[0], sd_r[0])
    _, e_c = _attempt(lambda: cand.reload(load_c))
    _, e_r = _attempt(lambda: ref.reload(load_r))
    if e_c or e_r:
        what = "each other's state_dict" if cross else "its own state_dict"
        tracker.record(step, "state_dict", None, None, None,
                       f"loading {what} failed: candidate: {_error_text(e_c) if e_c else 'ok'} | "
                       f"reference: {_error_text(e_r) if e_r else 'ok'}")
        if cross:  # go on from each side's own state: the numbers are still compared
            sd_c, sd_r = _attempt(cand.state_dict), _attempt(ref.state_dict)
            for driver, (own, e) in ((cand, sd_c), (ref, sd_r)):
                if e is None:
                    _attempt(lambda: driver.reload(own))


def layout_difference(sd_c: dict, sd_r: dict) -> str:
    """What one state dict's layout has that the other's lacks, in words ("" when the same):
    param_groups keys, and per-parameter state keys (over every group and parameter)."""
    def group_keys(sd):
        return {k for g in sd.get("param_groups", ()) for k in g if k != "params"}

    def state_keys(sd):
        return {k for st in sd.get("state", {}).values() if isinstance(st, dict) for k in st}

    parts = []
    for what, keys in (("param_groups", group_keys), ("state", state_keys)):
        kc, kr = keys(sd_c), keys(sd_r)
        if kr - kc:
            parts.append(f"the candidate's state dict lacks {_quoted(kr - kc)} in {what}")
        if kc - kr:
            parts.append(f"the reference's lacks {_quoted(kc - kr)} in {what}")
    return "; ".join(parts)


def _quoted(keys) -> str:
    return ", ".join(repr(k) for k in sorted(keys, key=str))


def _rollback(tracker: _Tracker, step: int, cand, ref, saved: dict) -> None:
    """The rollback axis (matrix.ROLLBACKS), after `step`: save both sides' state_dicts where a
    pair starts, load them back into the same optimizers where it ends."""
    for save_at, load_at in ROLLBACKS:
        if step == save_at:
            saved[load_at] = (_attempt(cand.state_dict), _attempt(ref.state_dict))
        elif step == load_at and load_at in saved:
            (sd_c, e_c), (sd_r, e_r) = saved.pop(load_at)
            if not (e_c or e_r):  # (a state_dict that raises is reported by the other reloads)
                _, e_c = _attempt(lambda: cand.opt.load_state_dict(sd_c))
                _, e_r = _attempt(lambda: ref.opt.load_state_dict(sd_r))
            if e_c or e_r:
                tracker.record(step, "state_dict", None, None, None,
                               f"loading the state_dict of step {save_at} back in place failed: candidate: "
                               f"{_error_text(e_c) if e_c else 'ok'} | reference: {_error_text(e_r) if e_r else 'ok'}")
            _compare_drivers(tracker, step, cand, ref, cand.pset.names)


def _rollback_own(step: int, drivers: list, saved: dict) -> bool:
    """The rollback axis for drivers beside the two sides (the shadow, torch's for-loop path):
    each loads its own state of the same earlier step back. False when one cannot."""
    ok = True
    for save_at, load_at in ROLLBACKS:
        key = ("own", load_at)
        if step == save_at:
            saved[key] = [_attempt(d.state_dict) for d in drivers]
        elif step == load_at and key in saved:
            for d, (sd, e) in zip(drivers, saved.pop(key)):
                ok = ok and e is None and _attempt(lambda: d.opt.load_state_dict(sd))[1] is None
    return ok


def _grad_through_step(pset):
    leaves = [leaf for leaf in pset.leaves if leaf.requires_grad]
    loss = sum((p.abs() if p.is_complex() else p).sum() for p in pset.params if p.requires_grad)
    return leaves, torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)


def _compare_backward(tracker: _Tracker, step: int, pset_c, pset_r) -> None:
    """differentiable=True promises a graph through the step: the gradient of the updated
    parameters w.r.t. the initial ones must be bit-identical too. Only after the first step:
    torch's own in-place state updates make later multi-step graphs unusable for both sides."""
    (got_c, e_c), (got_r, e_r) = _attempt(lambda: _grad_through_step(pset_c)), _attempt(lambda: _grad_through_step(pset_r))
    if e_c or e_r:
        if not (e_c and e_r and type(e_c) is type(e_r) and str(e_c) == str(e_r)):
            tracker.errors(step, e_c, e_r)
        return
    names = [n for n, leaf in zip(pset_r.names, pset_r.leaves) if leaf.requires_grad]
    for name, gc, gr in zip(names, got_c[1], got_r[1]):
        if (gc is None) != (gr is None):
            tracker.record(step, "grad", name, None, None, "only one side has a gradient through the step")
        elif gc is not None:
            diff = compare(gc, gr)
            if diff is not None:
                tracker.record(step, "grad", name, "d(sum params)/d(initial param)", diff)


def _describe(div: Divergence) -> str:
    return div.describe()


def default_reference(candidate: Subject) -> Subject:
    """torch.optim's class of the candidate's algorithm; for optparity's own Functional* classes
    torch.distributed.optim's functional class they reproduce (the pairing `check --all` uses)."""
    if candidate.algorithm is None:
        raise ValueError(f"cannot tell which torch.optim class {candidate.label} corresponds to; pass a reference")
    algo = candidate.algorithm
    if algorithms.spec(algo).functional_upstream:
        import optparity.distributed as od

        if candidate.obj is getattr(od, f"Functional{algo}", None):
            from optparity.harness.upstream import upstream_functional

            return Subject.of(upstream_functional(algo), algo)
    return Subject(algorithms.torch_class(algo), "optimizer", algo, f"torch.optim:{algo}")
