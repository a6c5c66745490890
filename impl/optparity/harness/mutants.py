"""Planted bugs: single edits to correct optimizers that the harness must catch.

Each mutant rewrites one snippet of an optparity module's source (the snippet must occur
exactly once), executes the result as a fresh module, and checks the mutated optimizer
against torch.optim. A harness that lets one through has lost its teeth. Kinds:
  numerics — mathematically equal to the original, bitwise different
  option   — only shows when one option is on (named in `shows_under`)
  logic    — a plain bug
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from optparity.harness.algorithms import SPECS, Mutant, spec
from optparity.harness.params import CHUNK, GRAIN, SMALL, features

# Each algorithm's planted bugs live in its description (harness/algorithms/<algo>.py).
ALGORITHM_MUTANTS: tuple[Mutant, ...] = tuple(m for s in SPECS.values() for m in s.mutants)


# --- Edge mutants (issue 8): each misbehaves by one ULP (or one wrong value) only under one
# condition of the matrix's edge axes, so the axis is what catches it. They are subclasses of
# optparity's own optimizer, as a user's candidate would be: `kind` names the axis, `shows_under`
# the condition, `exposed(case)` says which cases carry it (tests/test_mutants.py runs the mutant
# over every other case and expects a pass).


@dataclass(frozen=True)
class EdgeMutant:
    name: str
    algorithm: str
    kind: str  # the axis (matrix.EDGE_AXES) or the comparison ("caller_grad", "zero_grad", "hooks", ...)
    shows_under: str
    make: Callable[[], type]
    exposed: Callable[[Any], bool]  # does this case carry the condition?
    # an interaction's conditions one by one (exposed: all of them); a case with only some of
    # them must leave the mutant silent (tests/test_covering.py)
    parts: tuple = ()

    def build(self) -> type:
        cls = self.make()
        cls.__name__ = cls.__qualname__ = self.algorithm  # the default reference is found by name
        return cls


def _up(p: Tensor, mask: Tensor) -> None:
    """One ULP up where `mask` holds."""
    p.copy_(torch.where(mask, torch.nextafter(p, torch.full_like(p, math.inf)), p))


def _flat_index(p: Tensor) -> Tensor:
    return torch.arange(p.numel()).reshape(p.shape)


def _dense(p: Tensor) -> bool:
    """Non-overlapping and dense (every storage element between first and last is the tensor's)."""
    span = 1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride()) if n > 1)
    return p.numel() == span


def _edge_class(algo: str, *, after=None, grad=None, before=None, methods=None) -> Callable[[], type]:
    """A subclass of optparity.optim.<algo>: `grad(g, p) -> g'` feeds the step a private copy of
    each gradient (the caller's .grad is restored), `before(opt)` / `after(opt)` run around the
    step (`after` may return a cleanup), `methods` override others."""

    def make() -> type:
        base = spec(algo).optparity_class()

        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            saved = []
            # fused kernels under GradScaler unscale the caller's grads in place: leave those alone
            if grad is not None and getattr(self, "grad_scale", None) is None:
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None and not p.grad.is_sparse:
                            new = grad(p.grad, p)
                            if new is not None:
                                saved.append((p, p.grad))
                                p.grad = new
            undo = before(self) if before is not None else None
            try:
                base.step(self, None if closure is None else (lambda: loss))
            finally:
                if undo is not None:
                    undo()
                for p, g in saved:
                    p.grad = g
            if after is not None:
                with torch.no_grad():
                    after(self)
            return loss

        return type(f"{algo}Edge", (base,), {"step": step, **(methods or {})})

    return make


def _each_param(pick):
    """after(): nudge, in every param, the elements pick(opt, group, p) selects (a bool mask or None)."""
    def after(opt):
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                if p.is_complex():
                    continue
                mask = pick(opt, group, p, i)
                if mask is not None:
                    _up(p, mask if isinstance(mask, Tensor) else torch.ones_like(p, dtype=torch.bool))
    return after


def _grad_mask(cond):
    """pick() from a condition on the (dense) gradient's elements."""
    def pick(opt, group, p, i):
        g = p.grad
        if g is None or g.is_sparse:
            return None
        mask = cond(g, p)
        return mask if bool(mask.any()) else None
    return pick


def _swap_attr(name, value_of):
    """before(): replace opt.<name> (set by GradScaler) for the step, restoring it after."""
    def before(opt):
        old = getattr(opt, name, None)
        new = value_of(old)
        if old is None or new is old:
            return None
        setattr(opt, name, new)
        return lambda: setattr(opt, name, old)
    return before


def _step_float32(opt):
    for state in opt.state.values():
        s = state.get("step")
        if isinstance(s, Tensor) and s.dtype == torch.float64:
            state["step"] = s.float()


def _zero_grad_to_none(self, set_to_none: bool = True):
    spec_base = type(self).__mro__[1]
    return spec_base.zero_grad(self, True)  # zeros asked for, None given


def _state_dict_without_post_hooks(self):
    hooks, self._optimizer_state_dict_post_hooks = self._optimizer_state_dict_post_hooks, OrderedDict()
    try:
        return type(self).__mro__[1].state_dict(self)
    finally:
        self._optimizer_state_dict_post_hooks = hooks


def _load_and_consume(self, state_dict):
    type(self).__mro__[1].load_state_dict(self, state_dict)
    state_dict["state"].clear()  # "free the checkpoint": the caller's dict is emptied



def _load_keeping_stale_state(self, state_dict):
    """load_state_dict that merges into the current state (as torch's ZeroRedundancyOptimizer
    does): a parameter the dict has no state for keeps its own."""
    before = dict(self.state)
    type(self).__mro__[1].load_state_dict(self, state_dict)
    for p, st in before.items():
        if p not in self.state:
            self.state[p] = st


def _negate_caller_grad(opt):
    """before(): for maximize groups, negate the caller's .grad in place and step with maximize off
    (the same numbers reach the parameters; the caller's gradient is left negated)."""
    flipped = []
    for group in opt.param_groups:
        if group.get("maximize"):
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.neg_()
            group["maximize"] = False
            flipped.append(group)

    def undo():
        for group in flipped:
            group["maximize"] = True
    return undo


def _fused(case) -> bool:
    return case.path == "fused"


def _sizes_set(case) -> bool:
    return "sizes" in features(case.param_set)


def _has(case, feature: str) -> bool:
    """Does the case's parameter set build `feature` (its name, or a part of a composed set)?"""
    return feature in features(case.param_set)


_HUGE = {dt: torch.finfo(dt).max ** 0.5 for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_TINY = {dt: torch.finfo(dt).tiny for dt in _HUGE}


def _edge_mutants() -> tuple[EdgeMutant, ...]:
    E = EdgeMutant
    out = [
        E("edge_adam_past_65536", "Adam", "sizes", "elements past 65,536 (a second chunk)",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: _flat_index(p) >= CHUNK if p.numel() > CHUNK else None)),
          _sizes_set),
        E("edge_sgd_simd_tail", "SGD", "sizes", "the tail after the last full 16-lane vector (length > 64)",
          _edge_class("SGD", after=_each_param(lambda o, g, p, i: _flat_index(p) >= p.numel() - p.numel() % 16
                                               if p.numel() > SMALL and p.numel() % 16 else None)),
          _sizes_set),
        E("edge_adam_over_110_tensors", "Adam", "tensor_count", "foreach over more than 110 tensors",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: True if g.get("foreach") and i >= 110 else None)),
          lambda c: c.param_set.startswith("many") and c.path == "foreach"),
        E("edge_adam_channels_last", "Adam", "layouts", "channels_last 4-D parameters",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: True if p.dim() == 4 and not p.is_contiguous()
                                                and p.is_contiguous(memory_format=torch.channels_last) else None)),
          lambda c: _has(c, "layouts")),
        E("edge_sgd_grad_strides", "SGD", "layouts", "a dense parameter whose gradient has other strides",
          _edge_class("SGD", after=_each_param(lambda o, g, p, i: True if p.grad is not None and not p.grad.is_sparse
                                               and p.numel() > 1 and _dense(p) and p.grad.stride() != p.stride() else None)),
          lambda c: _has(c, "layouts")),
        E("edge_rmsprop_transposed", "RMSprop", "layouts", "a transposed (dense, column-major) parameter",
          _edge_class("RMSprop", after=_each_param(lambda o, g, p, i: True if p.dim() == 2 and _dense(p)
                                                   and not p.is_contiguous() else None)),
          lambda c: _has(c, "layouts")),
        E("edge_adam_nan_to_zero", "Adam", "values", "NaN in a gradient (read as 0)",
          _edge_class("Adam", grad=lambda g, p: torch.nan_to_num(g, nan=0.0, posinf=math.inf, neginf=-math.inf)
                      if g.is_floating_point() and bool(g.isnan().any()) else None),
          lambda c: c.param_set == "values"),
        E("edge_adagrad_inf_clamped", "Adagrad", "values", "+-inf in a gradient (clamped to the largest finite)",
          _edge_class("Adagrad", grad=lambda g, p: g.clamp(-torch.finfo(g.dtype).max, torch.finfo(g.dtype).max)
                      if g.is_floating_point() and bool(g.isinf().any()) else None),
          lambda c: c.param_set == "values"),
        E("edge_sgd_flush_subnormals", "SGD", "values", "subnormal gradients (flushed to zero)",
          _edge_class("SGD", grad=lambda g, p: torch.where(g.abs() < _TINY[g.dtype], g * 0, g)
                      if g.dtype in _TINY and bool(((g != 0) & (g.abs() < _TINY[g.dtype])).any()) else None),
          lambda c: c.param_set == "values"),
        # (the base sets have -0.0 gradients too, but only on nonzero parameters)
        E("edge_sgd_negative_zero", "SGD", "values", "-0.0 in a gradient of a zero parameter (read as +0.0)",
          _edge_class("SGD", grad=lambda g, p: torch.where((g == 0) & (p == 0), g + 0.0, g)
                      if g.is_floating_point() and bool(torch.signbit(g[(g == 0) & (p == 0)]).any()) else None),
          lambda c: c.param_set == "values"),
        E("edge_adam_huge_grad", "Adam", "values", "gradients whose square overflows",
          _edge_class("Adam", after=_each_param(_grad_mask(lambda g, p: g.isfinite() & (g.abs() > _HUGE.get(g.dtype, math.inf))))),
          lambda c: c.param_set == "values"),
        E("edge_adam_after_step_100", "Adam", "lengths", "steps after the 100th",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: True if p in o.state and "step" in o.state[p]
                                                and float(o.state[p]["step"]) > 100 else None)),
          lambda c: c.steps > 100),
        E("edge_adam_threads", "Adam", "threads", "several intra-op threads (the second thread's half)",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: _flat_index(p) >= p.numel() // 2
                                                if torch.get_num_threads() > 1 and p.numel() >= 2 * GRAIN else None)),
          lambda c: c.threads > 1),
        E("edge_adam_dtype_mix", "Adam", "dtype_mix", "a group mixing dtypes",
          _edge_class("Adam", after=_each_param(lambda o, g, p, i: True if len({q.dtype for q in g["params"] if not q.is_complex()}) > 1 else None)),
          lambda c: _has(c, "dtype_mix")),
        E("edge_adamw_bfloat16", "AdamW", "low_precision", "bfloat16 parameters",
          _edge_class("AdamW", after=_each_param(lambda o, g, p, i: True if p.dtype == torch.bfloat16 else None)),
          lambda c: c.dtype == torch.bfloat16 or c.param_set == "dtype_mix"
          or (_has(c, "dtype_mix") and c.dtype == torch.float32)),  # a composed mix adds bfloat16 to float32
        E("edge_adam_found_inf_ignored", "Adam", "amp", "GradScaler's found_inf (fused: the step is not skipped)",
          _edge_class("Adam", before=_swap_attr("found_inf", lambda fi: torch.zeros_like(fi) if fi is not None and bool(fi) else fi)),
          lambda c: c.amp and _fused(c)),
        E("edge_sgd_grad_scale_ignored", "SGD", "amp", "GradScaler's grad_scale (fused: grads left scaled)",
          _edge_class("SGD", before=_swap_attr("grad_scale", lambda gs: None)),
          lambda c: c.amp and _fused(c)),
        E("edge_adam_step_float32", "Adam", "default_dtype", "torch.set_default_dtype(float64) (step kept float32)",
          _edge_class("Adam", after=_step_float32),
          lambda c: c.default_dtype == torch.float64),
        E("edge_adam_maximize_in_callers_grad", "Adam", "caller_grad", "maximize (negates the caller's .grad)",
          _edge_class("Adam", before=_negate_caller_grad),
          lambda c: bool(c.config.get("maximize"))),
        E("edge_sgd_zero_grad_to_none", "SGD", "zero_grad", "zero_grad(set_to_none=False) (sets None)",
          _edge_class("SGD", methods={"zero_grad": _zero_grad_to_none}), lambda c: True),
        E("edge_adam_state_dict_skips_post_hooks", "Adam", "hooks", "state_dict post-hooks (not run)",
          _edge_class("Adam", methods={"state_dict": _state_dict_without_post_hooks}), lambda c: True),
        E("edge_adam_load_consumes_dict", "Adam", "load_state_dict", "load_state_dict (empties the caller's dict)",
          _edge_class("Adam", methods={"load_state_dict": _load_and_consume}), lambda c: True),
        E("edge_adam_rollback_keeps_stale_state", "Adam", "rollback",
          "a state_dict loaded into an optimizer that trained since (newer state kept)",
          _edge_class("Adam", methods={"load_state_dict": _load_keeping_stale_state}),
          lambda c: c.axis == "rollback"),
    ]
    if spec("SGD").sparse_grads:
        out.append(E("edge_sgd_sparse", "SGD", "sparse", "sparse gradients",
                     _edge_class("SGD", after=_each_param(lambda o, g, p, i: True if p.grad is not None and p.grad.is_sparse else None)),
                     lambda c: _has(c, "sparse")))
    return tuple(m for m in out if m.algorithm in SPECS)


# --- Mutants of issue 17's conditions (harness/covering.py, params.DEGENERATE, harness/amp.py):
# kind "degenerate", "amp_recipes" or "reload" for one new condition, "interaction" for a bug that
# needs two at once (shows_under names both); each is silent in every case lacking its condition(s).


def _dtype_groups(group) -> dict:
    """A param group's real tensors by dtype, in order (how foreach and fused kernels split it)."""
    out: dict = {}
    for q in group["params"]:
        if not q.is_complex():
            out.setdefault(q.dtype, []).append(q)
    return out


def _after_empty_in_foreach(o, g, p, i):
    # a foreach step that drops zero-element tensors from one list but not the next: every
    # tensor after an empty one gets its neighbour's update (here: one ULP off)
    return True if g.get("foreach") and p.numel() and any(q.numel() == 0 for q in g["params"][:i]) else None


def _led_by_empty(o, g, p, i):
    # a dtype group (of a group holding several dtypes) whose first tensor is empty is mis-sized
    groups = _dtype_groups(g)
    same = groups.get(p.dtype, [])
    return True if len(groups) > 1 and same and same[0].numel() == 0 and p is not same[0] else None


def _before_trailing_empty(o, g, p, i):
    # a fused step that finds each dtype bucket's end from its last tensor: a bucket ending in a
    # zero-element tensor mis-sizes the tensor before it (here: one ULP off)
    same = _dtype_groups(g).get(p.dtype, []) if g.get("fused") else []
    return True if len(same) >= 2 and same[-1].numel() == 0 and p is same[-2] else None


def _other_dtype_beside_sparse(o, g, p, i):
    # sparse gradients split the group: the dense remainder of the other dtype is mishandled
    sparse = any(q.grad is not None and q.grad.is_sparse for q in g["params"])
    first = g["params"][0].dtype
    return True if sparse and len(_dtype_groups(g)) > 1 and p.dtype != first else None


def _scalar_among_large(o, g, p, i):
    return True if p.dim() == 0 and any(q.numel() >= 4096 for q in g["params"]) else None


def _extreme_aspect(o, g, p, i):
    return True if p.dim() == 2 and min(p.shape) == 1 and max(p.shape) >= 1024 else None


def _all_ones_shape(o, g, p, i):
    return True if p.dim() >= 2 and all(n == 1 for n in p.shape) else None


def _found_inf_dropped_after_unscale(opt):
    """before(): a fused step that honours found_inf only with grad_scale (after unscale_,
    GradScaler passes found_inf and grad_scale None)."""
    fi = getattr(opt, "found_inf", None)
    if fi is None or getattr(opt, "grad_scale", None) is not None or not bool(fi):
        return None
    opt.found_inf = torch.zeros_like(fi)
    return lambda: setattr(opt, "found_inf", fi)


def _found_inf_leaks(opt):
    """before(): found_inf kept class-wide: the next optimizer of the class stepped after one that
    found an infinity skips too (one scaler over two optimizers: only one of them must skip)."""
    fi = getattr(opt, "found_inf", None)
    if fi is None:
        return None
    cls, mine = type(opt), bool(fi)
    last = cls.__dict__.get("_optparity_last_found_inf")
    cls._optparity_last_found_inf = (id(opt), mine)
    if last is None or last[0] == id(opt) or not last[1] or mine:
        return None
    opt.found_inf = torch.ones_like(fi)
    return lambda: setattr(opt, "found_inf", fi)


def _forget_found_inf_on_init(self, *args, **kwargs):
    type(self).__mro__[1].__init__(self, *args, **kwargs)
    type(self)._optparity_last_found_inf = None  # a new optimizer (a new case, a reload) starts clean


def _autocast_nudge(opt):
    if torch.is_autocast_enabled("cpu"):
        _each_param(lambda o, g, p, i: True)(opt)


def _load_after_first_step_nudged(self, state_dict):
    """load_state_dict that rounds square_avg up one ULP when the state was saved right after the
    first step (a freshly initialised state; the standard reloads come after steps 4 and 8)."""
    type(self).__mro__[1].load_state_dict(self, state_dict)
    steps = [int(float(st["step"])) for st in self.state.values() if "step" in st]
    if steps and max(steps) == 1:
        for st in self.state.values():
            if isinstance(st.get("square_avg"), Tensor):  # a new tensor: the caller's dict stays as it was
                st["square_avg"] = torch.nextafter(st["square_avg"], torch.full_like(st["square_avg"], math.inf))


def _recipe(case) -> str | None:
    return getattr(case, "amp_recipe", None)


def _both(*parts) -> tuple:
    """(exposed, parts) of an interaction: every part at once."""
    return (lambda c: all(p(c) for p in parts)), parts


def _cover_mutants() -> tuple[EdgeMutant, ...]:
    E = EdgeMutant
    out = [
        E("cover_adam_foreach_after_empty", "Adam", "interaction",
          "foreach path x a zero-element parameter inside the group (the tensors after it)",
          _edge_class("Adam", after=_each_param(_after_empty_in_foreach)),
          *_both(lambda c: c.path == "foreach", lambda c: _has(c, "degenerate"))),
        E("cover_adam_dtype_group_led_by_empty", "Adam", "interaction",
          "dtype mix x a zero-element parameter first of its dtype group",
          _edge_class("Adam", after=_each_param(_led_by_empty)),
          *_both(lambda c: _has(c, "degenerate"), lambda c: _has(c, "dtype_mix"))),
        E("cover_adam_fused_bucket_ending_empty", "Adam", "interaction",
          "fused x a zero-element parameter last of its dtype bucket (the tensor before it)",
          _edge_class("Adam", after=_each_param(_before_trailing_empty)),
          *_both(lambda c: c.path == "fused", lambda c: _has(c, "degenerate"))),
        E("cover_sgd_sparse_beside_other_dtype", "SGD", "interaction",
          "sparse gradients x parameters of another dtype in the same group",
          _edge_class("SGD", after=_each_param(_other_dtype_beside_sparse)),
          *_both(lambda c: _has(c, "sparse"), lambda c: _has(c, "dtype_mix"))),
        E("cover_adam_fused_found_inf_after_unscale", "Adam", "interaction",
          "fused x unscale_ before step (found_inf with grad_scale None: the skip is lost)",
          _edge_class("Adam", before=_found_inf_dropped_after_unscale),
          *_both(lambda c: c.path == "fused", lambda c: _recipe(c) in ("unscale_clip", "two_optimizers"))),
        E("cover_adamw_found_inf_leaks_between_optimizers", "AdamW", "interaction",
          "fused x one GradScaler over two optimizers (the second skips when the first found inf)",
          _edge_class("AdamW", before=_found_inf_leaks, methods={"__init__": _forget_found_inf_on_init}),
          *_both(lambda c: c.path == "fused", lambda c: _recipe(c) == "two_optimizers")),
        E("cover_adam_scalar_among_large", "Adam", "degenerate", "a 0-dim tensor in a group with 4096-element ones",
          _edge_class("Adam", after=_each_param(_scalar_among_large)), lambda c: _has(c, "degenerate")),
        E("cover_sgd_extreme_aspect", "SGD", "degenerate", "extreme aspect ratios (1x4096, 4096x1)",
          _edge_class("SGD", after=_each_param(_extreme_aspect)), lambda c: _has(c, "degenerate")),
        E("cover_adagrad_all_ones_shape", "Adagrad", "degenerate", "a one-element tensor of several dimensions (1x1)",
          _edge_class("Adagrad", after=_each_param(_all_ones_shape)), lambda c: _has(c, "degenerate")),
        E("cover_adam_step_under_autocast", "Adam", "amp_recipes", "a step taken inside torch.autocast (bfloat16)",
          _edge_class("Adam", after=_autocast_nudge), lambda c: _recipe(c) == "bf16_autocast"),
        E("cover_rmsprop_reload_after_first_step", "RMSprop", "reload", "a state_dict reloaded right after the first step",
          _edge_class("RMSprop", methods={"load_state_dict": _load_after_first_step_nudged}),
          lambda c: getattr(c, "reload", "standard") == "every_step"),
    ]
    return tuple(m for m in out if m.algorithm in SPECS)


EDGE_MUTANTS: tuple[EdgeMutant, ...] = _edge_mutants() + _cover_mutants()
# the kinds of issue 17's mutants: what `optparity selftest` and tests/test_mutants.py group them by
COVER_KINDS = ("degenerate", "amp_recipes", "reload", "interaction")

MUTANTS: tuple = ALGORITHM_MUTANTS + EDGE_MUTANTS


def by_name(name: str) -> Mutant:
    for m in MUTANTS:
        if m.name == name:
            return m
    raise KeyError(f"no mutant named {name!r}; known: {', '.join(m.name for m in MUTANTS)}")
