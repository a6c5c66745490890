"""Run one case: candidate and reference side by side on identical copies, compared bit for bit
after every step (parameters, every state tensor, state-dict hyperparameters)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optparity.harness import algorithms
from optparity.harness.bitwise import Difference, compare
from optparity.harness.candidates import NotApplicable, algorithm_of, kind_of, load_object, make_driver
from optparity.harness.matrix import CROSS_LOAD, LR_CHANGE, RELOAD_OWN, Case
from optparity.harness.params import make_grads, make_params


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
    where: str  # "param", "state", "state_dict", "error", "grad"
    param: str | None
    key: str | None
    difference: Difference | None
    message: str

    def as_dict(self) -> dict:
        d = {"step": self.step, "where": self.where, "param": self.param, "key": self.key, "message": self.message}
        if self.difference is not None:
            diff = self.difference
            d.update(element=list(diff.index) if diff.index is not None else None,
                     candidate=_jsonable(diff.candidate), reference=_jsonable(diff.reference),
                     abs_error=diff.abs_error, ulp=diff.ulp)
        return d


def _jsonable(v):
    if isinstance(v, complex):
        return [v.real, v.imag]
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass
class CaseResult:
    case: Case
    status: str  # "pass", "fail", "skip"
    steps_run: int = 0
    divergence: Divergence | None = None
    worst_ulp: int = 0  # over every param and state tensor, every step
    fused_vs_forloop_ulp: int | None = None  # measured, informational
    message: str = ""
    seconds: float = 0.0


class _Tracker:
    """Keeps the first divergence and the worst ULP distance seen."""

    def __init__(self):
        self.first: Divergence | None = None
        self.worst_ulp = 0

    def record(self, step, where, param, key, diff: Difference | None, message: str = ""):
        if diff is not None and diff.max_ulp is not None:
            self.worst_ulp = max(self.worst_ulp, diff.max_ulp)
        if self.first is None:
            text = message or (diff.describe() if diff else "")
            self.first = Divergence(step, where, param, key, diff, text)


def _compare_value(a: Any, b: Any) -> Difference | None:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return compare(a, b)
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


def _clone(grads: list[Tensor | None]) -> list[Tensor | None]:
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
    """Compare errors; True when the case must stop (either side raised)."""
    if e_cand is None and e_ref is None:
        return False
    if e_cand is None or e_ref is None or type(e_cand) is not type(e_ref) or str(e_cand) != str(e_ref):
        cand = _error_text(e_cand) if e_cand else "no error"
        ref = _error_text(e_ref) if e_ref else "no error"
        tracker.record(step, "error", None, None, None, f"candidate: {cand} | reference: {ref}")
    return True


def run_case(case: Case, candidate: Subject, reference: Subject) -> CaseResult:
    start = time.perf_counter()
    result = CaseResult(case, "pass")
    try:
        _run(case, candidate, reference, result)
    except NotApplicable as e:
        result.status, result.message = "skip", str(e)
    result.seconds = time.perf_counter() - start
    return result


def _new_pset(case: Case):
    return make_params(case.param_set, case.dtype, case.seed, case.second_group,
                       differentiable=bool(case.config.get("differentiable")))


# The step the running case is in (0 while the optimizers are built). check.py points this at a
# shared multiprocessing.Value in each worker, so that a hung case can be reported as "hung in step N".
STEP_MONITOR = None


def _at_step(step: int) -> None:
    if STEP_MONITOR is not None:
        STEP_MONITOR.value = step


def _run(case: Case, candidate: Subject, reference: Subject, result: CaseResult) -> None:
    _at_step(0)
    algo = case.algorithm
    hyper = {**case.config, **case.path_kwargs()}
    tracker = _Tracker()
    pset_c, pset_r = _new_pset(case), _new_pset(case)
    names = pset_r.names
    ref, e_ref = _attempt(lambda: make_driver(reference.obj, reference.kind, algo, pset_r, hyper))
    cand, e_cand = _attempt(lambda: make_driver(candidate.obj, candidate.kind, algo, pset_c, hyper))
    forloop = None
    if case.path == "fused" and e_ref is None:
        # fused kernels are not bit-equal to the for-loop path by design: measure how far they are.
        forloop, _ = _attempt(lambda: make_driver(reference.obj, reference.kind, algo, _new_pset(case),
                                                  {**case.config, "foreach": False}))
        result.fused_vs_forloop_ulp = 0
    stop = _same_error(tracker, 0, e_cand, e_ref)
    differentiable = bool(case.config.get("differentiable"))
    reloadable = (not differentiable and getattr(cand, "supports_state_dict", False)
                  and getattr(ref, "supports_state_dict", False))
    # lr changes and closure losses only make sense between torch.optim-style optimizers.
    drivers = [d for d in (cand, ref, forloop) if d is not None]
    param_groups = all(getattr(d, "supports_param_groups", False) for d in drivers)
    step = 0
    while not stop and step < case.steps:
        step += 1
        _at_step(step)
        grads = make_grads(pset_r, case.seed, step)
        loss_r, e_ref = _attempt(lambda: ref.step(grads, step))
        loss_c, e_cand = _attempt(lambda: cand.step(_clone(grads), step))
        if _same_error(tracker, step, e_cand, e_ref):
            break
        if param_groups and _compare_value(loss_c, loss_r) is not None:
            tracker.record(step, "error", None, None, None,
                           f"step(closure) returned {loss_c!r}, the reference returned {loss_r!r}")
        _compare_drivers(tracker, step, cand, ref, names)
        if differentiable and step == 1:
            _compare_backward(tracker, step, pset_c, pset_r)
        if forloop is not None and _attempt(lambda: forloop.step(_clone(grads), step))[1] is None:
            for pc, pf in zip(cand.pset.params, forloop.pset.params):
                d = compare(pc, pf)
                if d is not None and d.max_ulp is not None:
                    result.fused_vs_forloop_ulp = max(result.fused_vs_forloop_ulp, d.max_ulp)
        if reloadable and step in (RELOAD_OWN, CROSS_LOAD):
            _reload(tracker, step, cand, ref, cross=(step == CROSS_LOAD))
        if step == LR_CHANGE and param_groups:
            for driver in drivers:
                driver.scale_lr(0.5)
    result.steps_run = step
    result.worst_ulp = tracker.worst_ulp
    if tracker.first is not None:
        result.status, result.divergence = "fail", tracker.first
        result.message = _describe(tracker.first)


def _reload(tracker: _Tracker, step: int, cand, ref, cross: bool) -> None:
    sd_c, sd_r = _attempt(cand.state_dict), _attempt(ref.state_dict)
    if sd_c[1] or sd_r[1]:
        _same_error(tracker, step, sd_c[1], sd_r[1])
        return
    _compare_param_groups(tracker, step, sd_c[0], sd_r[0])
    load_c, load_r = (sd_r[0], sd_c[0]) if cross else (sd_c[0], sd_r[0])
    _, e_c = _attempt(lambda: cand.reload(load_c))
    _, e_r = _attempt(lambda: ref.reload(load_r))
    if e_c or e_r:
        what = "the reference's state_dict into the candidate" if cross else "its own state_dict"
        tracker.record(step, "state_dict", None, None, None,
                       f"loading {what} failed: candidate: {_error_text(e_c) if e_c else 'ok'} | "
                       f"reference: {_error_text(e_r) if e_r else 'ok'}")


def _grad_through_step(pset):
    leaves = [leaf for leaf in pset.leaves if leaf.requires_grad]
    loss = sum((p.abs() if p.is_complex() else p).sum() for p in pset.params if p.requires_grad)
    return leaves, torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)


def _compare_backward(tracker: _Tracker, step: int, pset_c, pset_r) -> None:
    """differentiable=True promises a graph through the step: the gradient of the updated
    parameters w.r.t. the initial ones must be bit-identical too. Only after the first step:
    torch's own in-place state updates make later multi-step graphs unusable for both sides."""
    (got_c, e_c), (got_r, e_r) = _attempt(lambda: _grad_through_step(pset_c)), _attempt(lambda: _grad_through_step(pset_r))
    if _same_error(tracker, step, e_c, e_r):
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
    where = div.where + (f" {div.param}" if div.param else "") + (f"[{div.key!r}]" if div.key else "")
    return f"step {div.step}, {where}: {div.message}"


def default_reference(candidate: Subject) -> Subject:
    if candidate.algorithm is None:
        raise ValueError(f"cannot tell which torch.optim class {candidate.label} corresponds to; pass a reference")
    return Subject(algorithms.torch_class(candidate.algorithm), "optimizer", candidate.algorithm,
                   f"torch.optim:{candidate.algorithm}")
