"""One distributed case, as every rank runs it (inside harness/ranks.py's long-lived ranks).

run_on_rank() builds the candidate's side and the reference's side through the kind's driver,
feeds both the same gradients, steps both, and compares after every step: this rank's full
parameters against the reference's, and against the other ranks'; the consolidated state at the
state steps; then whatever the case's condition adds (add_param_group, an lr change, a reload at
the same or another world size). Differences go into runner's _Tracker (one harness: the same
records, distances and verdict rules as the single-process check), tagged with this rank.

Errors: a side that raises stops the case on every rank at the same point (the ranks agree on
it through one small all_gather after each phase), so a rank-local error does not leave its
peers waiting in the next collective.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from optparity.harness.bitwise import compare
from optparity.harness.candidates import NotApplicable, load_object
from optparity.harness.distributed.base import ADD_AT, LR_AT, RELOAD_AT, RELOADS, DistCase, RankContext
from optparity.harness.params import make_grads, make_params, to_device
from optparity.harness.runner import Divergence, RunOptions, _compare_param_groups, _compare_value, _Tracker

# state_dict comparisons at these steps (and at the last one)
STATE_STEPS = (1, RELOAD_AT)


@dataclass
class RankOutcome:
    """What one rank sends back for one case."""

    rank: int
    world_size: int
    tracker: _Tracker
    steps_run: int = 0
    not_applicable: tuple[str, tuple] | None = None  # (message, rejected options)
    uneven_error: bool = False  # some ranks raised and others did not: the process group may be unusable
    peer_failure: bool = False  # this rank's error is a collective that failed because a peer failed first
    seconds: float = 0.0


_SUBGROUPS: dict[tuple, Any] = {}


def subgroup(ranks: tuple[int, ...], world_size: int):
    """The process group of `ranks` (the default group when it is every rank); every rank must
    call this with the same arguments in the same order (dist.new_group's rule). Cached: making
    a group costs a rendezvous."""
    if len(ranks) == world_size:
        return None
    key = (ranks, world_size, id(dist.distributed_c10d._get_default_group()))
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(list(ranks))
    return _SUBGROUPS[key]


def device_of(rank: int, backend: str) -> str:
    if backend == "nccl":
        return f"cuda:{rank % torch.cuda.device_count()}"
    return "cpu"


def rank_seed(case: DistCase, rank: int) -> int:
    return (case.seed * 7919 + 104729 * (rank + 1)) % (2 ** 31)


def local_grads(pset, case: DistCase, rank: int, step: int):
    """The gradient rank `rank` computes at `step` (drawn as the single-process check draws)."""
    return make_grads(pset, rank_seed(case, rank), step)


def global_grads(pset, case: DistCase, step: int):
    """The averaged gradient every rank holds after an all-reduce: the ranks' local gradients
    summed in rank order and divided by the world size, computed here without communication so
    that the reference gets exactly the same bits."""
    total = None
    for r in range(case.world_size):
        g = local_grads(pset, case, r, step)
        total = g if total is None else [None if a is None or b is None else a + b for a, b in zip(total, g)]
    return [None if t is None else t / case.world_size for t in total]


def _param_set(case: DistCase, device: str):
    pset = make_params(case.param_set, case.dtype, case.seed, case.second_group, device=device)
    # Parameters are contiguous, as nn.Parameters are: Gloo's broadcast into a strided view writes
    # its elements contiguously from the view's start (measured; docs/distributed-check.md), so
    # torch's own ZeroRedundancyOptimizer corrupts such a parameter on every rank but its owner.
    for i, p in enumerate(pset.params):
        if not p.is_contiguous():
            pset.params[i] = p.detach().contiguous().requires_grad_(p.requires_grad)
            pset.names[i] = f"{pset.names[i]}_contiguous"
    pset.leaves = pset.params
    if case.condition == "few_params":
        # fewer trainable parameters than ranks, and not a multiple of them
        keep = [i for i, p in enumerate(pset.params) if p.requires_grad][:max(case.world_size - 1, 1)]
        pset.params = [pset.params[i] for i in keep]
        pset.leaves = pset.params
        pset.names = [pset.names[i] for i in keep]
        pset.groups = [(list(range(len(keep))), {})]
    return pset


def _groups(pset, upto: int | None = None) -> list[dict]:
    """torch.optim-style groups over pset.params (the first `upto` groups)."""
    out = []
    for indices, overrides in pset.groups[:upto]:
        out.append({"params": [pset.params[i] for i in indices], **overrides})
    return out


def _flat(groups: list[dict]) -> list:
    return [p for g in groups for p in g["params"]]


def _attempt(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - an error is a fact to compare
        return None, e


class _Run:
    def __init__(self, rank: int, world_size: int, driver, obj, case: DistCase, options: RunOptions):
        self.rank, self.world_size, self.driver, self.obj = rank, world_size, driver, obj
        self.case, self.options = case, options
        self.tracker = _Tracker()
        self.device = device_of(rank, case.backend)
        self.outcome = RankOutcome(rank, world_size, self.tracker)
        self.hyper = {**case.config, **options.hyper, **case.path_kwargs()}
        self.reference = None

    # --- agreement between ranks -------------------------------------------------------------
    def agree(self, step: int, e_cand, e_ref) -> bool:
        """Record this rank's errors; True (on every rank) when any rank had one."""
        na = next((e for e in (e_cand, e_ref) if isinstance(e, NotApplicable)), None)
        if na is None and (e_cand is not None or e_ref is not None):
            self.tracker.errors(step, e_cand, e_ref)  # before the collective: it may fail if a peer is stuck
        flags = [None] * self.world_size
        dist.all_gather_object(flags, (e_cand is not None, e_ref is not None,
                                       None if na is None else (str(na), tuple(na.options))))
        refused = next((f[2] for f in flags if f[2] is not None), None)
        if refused is not None:  # the case cannot be expressed: not applicable on every rank
            self.outcome.not_applicable = refused
            return True
        erred = [bool(c or r) for c, r, _ in flags]
        if any(erred) and not all(erred):
            self.outcome.uneven_error = True
        return any(erred)

    def share(self, value):
        """The first non-None of the ranks' values, on every rank."""
        got = [None] * self.world_size
        dist.all_gather_object(got, value)
        return next((v for v in got if v is not None), None)

    # --- the sides ---------------------------------------------------------------------------
    def context(self, size: int) -> RankContext:
        ranks = tuple(range(size))
        return RankContext(self.rank, self.world_size, self.case, self.device, subgroup(ranks, self.world_size), ranks,
                           self.reference)

    def build(self, ctx: RankContext, pset, upto):
        if not ctx.in_group:
            return None
        groups = _groups(pset, upto)
        return self.driver.build(ctx, self.obj, _flat(groups), groups, self.case.algorithm, dict(self.hyper))

    def run(self) -> None:
        case, tr = self.case, self.tracker
        pset_c, pset_r = _param_set(case, self.device), _param_set(case, self.device)
        names = pset_r.names
        adding = case.condition == "add_param_group" and len(pset_r.groups) > 1
        upto = 1 if adding else None
        before, after = case.groups_before_after
        ctx = self.context(before)
        cand, e_c = _attempt(lambda: self.build(ctx, pset_c, upto))
        ref_groups = _groups(pset_r, upto)
        ref, e_r = _attempt(lambda: self.driver.build_reference(ctx, _flat(ref_groups), ref_groups,
                                                                 case.algorithm, dict(self.hyper)))
        if self.agree(0, e_c, e_r):
            return
        for step in range(1, case.steps + 1):
            self.outcome.steps_run = step - 1
            if adding and step == ADD_AT:
                group = _groups(pset_c)[1]
                _, e_c = _attempt(lambda: cand.add_param_group(group)) if cand is not None else (None, None)
                _, e_r = _attempt(lambda: ref.add_param_group(_groups(pset_r)[1]))
                if self.agree(step, e_c, e_r):
                    return
            grads = (local_grads(pset_r, case, self.rank, step) if self.driver.local_grads
                     else global_grads(pset_r, case, step))
            _, e_c = _attempt(lambda: self._step(cand, grads)) if cand is not None else (None, None)
            _, e_r = _attempt(lambda: self._step(ref, grads))
            if self.agree(step, e_c, e_r):
                return
            self.outcome.steps_run = step
            self.compare_params(step, cand, ref, names)
            if self.driver.ranks_agree:
                self.compare_ranks(step, cand, names)
            if step in STATE_STEPS or step == case.steps:
                if self.compare_state(step, cand, ref, names):
                    return
            if case.condition == "lr_change" and step == LR_AT:
                _, e_c = _attempt(lambda: cand.scale_lr(0.5)) if cand is not None else (None, None)
                _, e_r = _attempt(lambda: ref.scale_lr(0.5))
                if self.agree(step, e_c, e_r):
                    return
            if case.condition in RELOADS and step == RELOAD_AT:
                cand = self.reload(step, cand, pset_c, after)
                if cand is False:
                    return

    def _step(self, side, grads):
        side.set_gradients([None if g is None else g.clone() for g in grads])
        return side.step()

    # --- comparisons -------------------------------------------------------------------------
    def compare_params(self, step, cand, ref, names) -> None:
        if cand is None:
            return
        got, want = list(cand.full_params()), list(ref.full_params())
        if len(got) != len(want):
            self.tracker.record(step, "param", None, None, None,
                                f"full_params() gave {len(got)} tensors, the reference has {len(want)}")
        for name, pc, pr in zip(names, got, want):
            diff = compare(pc.detach(), pr.detach())
            if diff is not None:
                self.tracker.record(step, "param", name, None, diff)

    def compare_ranks(self, step, cand, names) -> None:
        """This rank's full parameters against the lowest rank holding the candidate."""
        mine = None if cand is None else [p.detach().cpu() for p in cand.full_params()]
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        first = next((r for r, v in enumerate(every) if v is not None), None)
        if mine is None or first is None or first == self.rank:
            return
        for name, a, b in zip(names, mine, every[first]):
            diff = compare(a, b)
            if diff is not None:
                self.tracker.record(step, "ranks", name, None, diff, f"differs from rank {first}'s: {diff.describe()}")

    def compare_state(self, step, cand, ref, names) -> bool:
        """The consolidated state against the reference's; True when the case must stop."""
        sd_c, e_c = _attempt(cand.full_state_dict) if cand is not None else (None, None)
        sd_r, e_r = _attempt(ref.full_state_dict)
        if self.agree(step, e_c, e_r):
            return True
        holders = [None] * self.world_size
        dist.all_gather_object(holders, sd_c is not None)
        if not any(holders):
            if self.rank == 0:
                self.tracker.record(step, "state_dict", None, None, None,
                                    "full_state_dict() returned None on every rank")
            return False
        if sd_c is None:
            return False
        compare_state_dicts(self.tracker, step, sd_c, sd_r, names)
        return False

    def reload(self, step, cand, pset_c, size):
        """Save the candidate's consolidated state, build a fresh candidate on `size` ranks over the
        same (trained) parameters, and load it there. False: the case must stop."""
        sd, e_c = _attempt(cand.full_state_dict) if cand is not None else (None, None)
        if self.agree(step, e_c, None):
            return False
        if not self.driver.state_per_rank:
            sd = self.share(sd)
            # the model checkpoint: every rank restarts from the parameters the saving ranks hold
            saved = self.share(None if cand is None else [p.detach().cpu() for p in cand.full_params()])
            with torch.no_grad():
                for p, q in zip(_flat(_groups(pset_c)), saved or ()):
                    p.copy_(q)
        if sd is None:
            if self.rank == 0:
                self.tracker.record(step, "state_dict", None, None, None, "no rank returned a state_dict to reload")
            return False
        ctx = self.context(size)
        fresh, e_c = _attempt(lambda: self.build(ctx, pset_c, None))
        if e_c is None and fresh is not None:
            _, e_c = _attempt(lambda: fresh.load_state_dict(sd))
        if self.agree(step, e_c, None):
            return False
        return fresh


def compare_state_dicts(tracker: _Tracker, step: int, sd_c: dict, sd_r: dict, names) -> None:
    """A consolidated state_dict against the reference's: every parameter's state, key by key,
    bit for bit, and the param groups' settings."""
    st_c, st_r = sd_c.get("state", {}), sd_r.get("state", {})
    for i in sorted(set(st_c) | set(st_r), key=str):
        name = names[i] if isinstance(i, int) and i < len(names) else str(i)
        if i not in st_c or i not in st_r:
            who = "consolidated candidate" if i in st_c else "reference"
            tracker.record(step, "state", name, None, None, f"only the {who} has state for this parameter")
            continue
        keys_c, keys_r = set(st_c[i]), set(st_r[i])
        if keys_c != keys_r:
            tracker.record(step, "state", name, None, None,
                           f"state keys differ: candidate {sorted(keys_c)}, reference {sorted(keys_r)}")
        for key in sorted(keys_c & keys_r):
            a, b = st_c[i][key], st_r[i][key]
            if isinstance(a, torch.Tensor):
                a = a.detach().cpu()
            if isinstance(b, torch.Tensor):
                b = b.detach().cpu()
            diff = _compare_value(a, b)
            if diff is not None:
                tracker.record(step, "state", name, key, diff)
    if "param_groups" in sd_c and "param_groups" in sd_r:
        _compare_param_groups(tracker, step, sd_c, sd_r)
    others_c, others_r = set(sd_c) - {"state", "param_groups"}, set(sd_r) - {"state", "param_groups"}
    if others_c != others_r:
        tracker.record(step, "state_dict", None, None, None,
                       f"state_dict keys differ: candidate {sorted(map(str, sd_c))}, reference {sorted(map(str, sd_r))}")
    for key in sorted(others_c & others_r, key=str):  # e.g. PostLocalSGDOptimizer's averager "step"
        diff = _compare_value(sd_c[key], sd_r[key])
        if diff is not None:
            tracker.record(step, "state_dict", None, key, diff if diff.numeric else None,
                           f"state_dict[{key!r}]: candidate {sd_c[key]!r}, reference {sd_r[key]!r}")


def _peer_failed(run: _Run, e: BaseException) -> None:
    """Return normally (the pool then hears from every rank that can still answer, and the rank
    that failed first is named by its own error), marking this rank's error as a peer's doing."""
    tr = run.tracker
    run.outcome.uneven_error = True
    if tr.error is None:
        run.outcome.peer_failure = True
        step = run.outcome.steps_run + 1
        tr.error = Divergence(step, "error", None, None, None,
                              f"a collective with the other ranks failed ({type(e).__name__}: {str(e)[:200]}): "
                              f"another rank failed first")
        tr.error_one_side = True
        tr.traceback = traceback.format_exc()[-6000:]


def run_on_rank(rank: int, world_size: int, kind: str, candidate: Any, case: DistCase, options: dict,
                reference: Any = None) -> RankOutcome:
    """The rank-side entry point (a module-level function: RankPool pickles it by name)."""
    from optparity.harness.distributed.registry import driver

    start = time.perf_counter()
    obj = load_object(candidate) if isinstance(candidate, str) else candidate
    run = _Run(rank, world_size, driver(kind), obj, case, RunOptions(**options))
    run.reference = load_object(reference) if isinstance(reference, str) else reference
    try:
        run.run()
    except NotApplicable as e:
        run.outcome.not_applicable = (str(e), tuple(e.options))
    except Exception as e:  # noqa: BLE001 - the harness's own collective failed: a peer went wrong first
        _peer_failed(run, e)
    tr = run.tracker
    for div in (tr.first_numeric, tr.first_api, tr.error):
        if div is not None:
            div.rank, div.world_size = rank, world_size
    if tr.worst is not None:
        tr.worst["rank"] = rank
    run.outcome.seconds = time.perf_counter() - start
    return run.outcome
