"""L-BFGS as plain functions: the history update and two-loop direction, the cubic step
interpolation, the strong-Wolfe line search (bracketing, then zoom) and the outer iterations
of one `step(closure)`.

torch.optim.LBFGS keeps all of this inside its class. Here the class (optparity.optim.lbfgs)
only flattens the parameters and owns the state dict; it hands `lbfgs()` a `FlatParams`.
Every floating-point operation, every choice between a Python number and a 0-dim tensor
(`t`, `H_diag`, the line-search values mix both) and every comparison is torch 2.13's, in its
order: bits depend on them. torch 2.14 added `maximize` (the loss and the flat gradient negated
where they are read); `lbfgs(maximize=True)` follows it, and the class offers it from 2.14 only.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["FlatParams", "lbfgs", "cubic_interpolate", "strong_wolfe", "update_history",
           "two_loop_direction"]

# Defaults of torch's line search. LBFGS.step passes only max_ls, so the group's
# tolerance_change never reaches the zoom: it always stops at 1e-9.
C1, C2, LS_TOLERANCE_CHANGE, MAX_LS = 1e-4, 0.9, 1e-9, 25


class FlatParams(NamedTuple):
    """The optimizer's parameters seen as one flat vector."""

    gather_grad: Callable[[], Tensor]  # all grads (None as zeros, complex as real pairs), one new tensor
    add: Callable[[Any, Tensor], None]  # params += step_size * flat update
    snapshot: Callable[[], list[Tensor]]  # contiguous copies of the params
    restore: Callable[[list[Tensor]], None]  # copy a snapshot back into the params


def _contiguous_copy(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimiser of the cubic through (x1, f1, slope g1) and (x2, f2, slope g2), clamped to
    `bounds` (default: the interval between x1 and x2); its midpoint if the cubic has none."""
    if bounds is None:
        bounds = (x1, x2) if x1 <= x2 else (x2, x1)
    lower, upper = bounds
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    discriminant = d1**2 - g1 * g2
    if not discriminant >= 0:  # also a NaN discriminant: torch's else-branch
        return (lower + upper) / 2.0
    d2 = discriminant.sqrt()
    # Measured from the farther point (x2 when x1 <= x2); torch writes both branches out.
    far, g_far, near, g_near = (x2, g2, x1, g1) if x1 <= x2 else (x1, g1, x2, g2)
    min_pos = far - (far - near) * ((g_far + d2 - d1) / (g_far - g_near + 2 * d2))
    # Python's max/min with this argument order: ties and tensor-vs-float picks are torch's.
    return min(max(min_pos, lower), upper)


def _armijo_fails(f_new, f, t, gtd, c1):
    """Not enough decrease for step t (sufficient-decrease condition violated)."""
    return f_new > (f + c1 * t * gtd)


def _curvature_holds(gtd_new, gtd, c2):
    """The strong Wolfe curvature condition."""
    return abs(gtd_new) <= -c2 * gtd


class _Bracket:
    """Trial steps with their losses, gradients and directional derivatives."""

    def __init__(self, ts, fs, gs, gtds):
        self.t, self.f, self.g, self.gtd = ts, fs, gs, gtds

    def set(self, i, t, f, g, gtd):
        self.t[i], self.f[i], self.g[i], self.gtd[i] = t, f, g, gtd


def _find_bracket(obj_func, x, t, d, f, g, gtd, c1, c2, max_ls):
    """Grow the step until an interval holds a Wolfe point (or one is hit).
    Returns (bracket, done, evaluations, iterations)."""
    f_new, g_new = obj_func(x, t, d)
    evals = 1
    gtd_new = g_new.dot(d)
    t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
    iters = 0
    while iters < max_ls:
        if _armijo_fails(f_new, f, t, gtd, c1) or (iters > 1 and f_new >= f_prev):
            return _Bracket([t_prev, t], [f_prev, f_new], [g_prev, _contiguous_copy(g_new)],
                            [gtd_prev, gtd_new]), False, evals, iters
        if _curvature_holds(gtd_new, gtd, c2):
            return _Bracket([t], [f_new], [g_new], None), True, evals, iters
        if gtd_new >= 0:
            return _Bracket([t_prev, t], [f_prev, f_new], [g_prev, _contiguous_copy(g_new)],
                            [gtd_prev, gtd_new]), False, evals, iters
        # extrapolate, at least 1% beyond t and at most 10 times it
        low_step = t + 0.01 * (t - t_prev)
        high_step = t * 10
        t_prev, t = t, cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                         bounds=(low_step, high_step))
        f_prev, g_prev, gtd_prev = f_new, _contiguous_copy(g_new), gtd_new
        f_new, g_new = obj_func(x, t, d)
        evals += 1
        gtd_new = g_new.dot(d)
        iters += 1
    if iters != max_ls:
        # Only a negative budget gets here; torch then reads its bracket before assigning it.
        raise UnboundLocalError("cannot access local variable 'bracket_f' where it is not associated with a value")
    # budget spent: fall back to [0, t] (no slopes needed, the zoom will not run)
    return _Bracket([0, t], [f, f_new], [g, g_new], None), False, evals, iters


def _low_high(fs):
    return (0, 1) if fs[0] <= fs[-1] else (1, 0)


def _zoom(obj_func, x, d, f, gtd, bracket, done, evals, iters, c1, c2, tolerance_change, max_ls, d_norm):
    """Shrink the bracket until a point satisfies the strong Wolfe conditions.
    Returns (loss, flat grad, step, evaluations)."""
    insufficient_progress = False
    low, high = _low_high(bracket.f)
    ts = bracket.t
    while not done and iters < max_ls:
        if abs(ts[1] - ts[0]) * d_norm < tolerance_change:
            break
        t = cubic_interpolate(ts[0], bracket.f[0], bracket.gtd[0], ts[1], bracket.f[1], bracket.gtd[1])
        # Keep t at least a tenth of the bracket away from its ends when the last try was
        # also near an end (or t fell outside).
        eps = 0.1 * (max(ts) - min(ts))
        if min(max(ts) - t, t - min(ts)) < eps:
            if insufficient_progress or t >= max(ts) or t <= min(ts):
                t = max(ts) - eps if abs(t - max(ts)) < abs(t - min(ts)) else min(ts) + eps
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False

        f_new, g_new = obj_func(x, t, d)
        evals += 1
        gtd_new = g_new.dot(d)
        iters += 1

        if _armijo_fails(f_new, f, t, gtd, c1) or f_new >= bracket.f[low]:
            bracket.set(high, t, f_new, _contiguous_copy(g_new), gtd_new)
            low, high = (0, 1) if bracket.f[0] <= bracket.f[1] else (1, 0)
        else:
            if _curvature_holds(gtd_new, gtd, c2):
                done = True
            elif gtd_new * (ts[high] - ts[low]) >= 0:
                # the old high end becomes the new low end
                bracket.set(high, ts[low], bracket.f[low], bracket.g[low], bracket.gtd[low])
            bracket.set(low, t, f_new, _contiguous_copy(g_new), gtd_new)
    return bracket.f[low], bracket.g[low], ts[low], evals


def strong_wolfe(obj_func, x, t, d, f, g, gtd, c1=C1, c2=C2, tolerance_change=LS_TOLERANCE_CHANGE,
                 max_ls=MAX_LS):
    """Line search along d from the params `x` (snapshot), initial step t, loss f, flat grad g
    and directional derivative gtd. obj_func(x, t, d) -> (loss at x + t*d, its flat grad).
    Returns (loss, flat grad, step, number of obj_func calls)."""
    d_norm = d.abs().max()
    g = _contiguous_copy(g)
    bracket, done, evals, iters = _find_bracket(obj_func, x, t, d, f, g, gtd, c1, c2, max_ls)
    return _zoom(obj_func, x, d, f, gtd, bracket, done, evals, iters, c1, c2, tolerance_change, max_ls, d_norm)


def update_history(flat_grad, prev_flat_grad, d, t, old_dirs, old_stps, ro, H_diag, history_size):
    """Append the newest curvature pair (when its y.s is safely positive), dropping the oldest
    beyond history_size; returns the new initial inverse-Hessian scale."""
    y = flat_grad.sub(prev_flat_grad)
    s = d.mul(t)
    ys = y.dot(s)
    if ys > 1e-10:
        if len(old_dirs) == history_size:
            for memory in (old_dirs, old_stps, ro):
                memory.pop(0)
        old_dirs.append(y)
        old_stps.append(s)
        ro.append(1.0 / ys)
        H_diag = ys / y.dot(y)
    return H_diag


def two_loop_direction(flat_grad, old_dirs, old_stps, ro, H_diag, al):
    """-H * grad by the two-loop recursion over the history, in one buffer; `al` (the
    optimizer's state list) receives the first loop's coefficients."""
    count = len(old_dirs)
    q = flat_grad.neg()
    for i in reversed(range(count)):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, H_diag)
    for i in range(count):
        be_i = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - be_i)
    return r


def _directional_evaluate(flat: FlatParams, closure, x, t, d, maximize: bool = False):
    """Loss and flat grad at x + t*d (both negated when maximizing); the params are put back to x
    afterwards."""
    flat.add(t, d)
    loss = float(closure())
    flat_grad = flat.gather_grad()
    flat.restore(x)
    return (-loss if maximize else loss), flat_grad


def lbfgs(flat: FlatParams, closure, state: dict, *, lr, max_iter: int, max_eval: int,
          tolerance_grad: float, tolerance_change: float, line_search_fn: str | None,
          history_size: int, maximize: bool = False):
    """One LBFGS.step(closure): up to max_iter iterations and max_eval closure calls.
    `state` is the optimizer's (global) state, updated in place with torch's keys; `closure`
    must already run with grad enabled. Returns the closure's first loss. With `maximize` (torch
    2.14+) the losses are negated here and `flat.gather_grad` must return the negated gradient."""
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)

    orig_loss = closure()
    loss = -float(orig_loss) if maximize else float(orig_loss)
    current_evals = 1
    state["func_evals"] += 1

    flat_grad = flat.gather_grad()
    opt_cond = flat_grad.abs().max() <= tolerance_grad
    if opt_cond:  # already optimal: no iteration, nothing else stored
        return orig_loss

    d, t = state.get("d"), state.get("t")
    old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
    H_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")

    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        state["n_iter"] += 1
        first_ever = state["n_iter"] == 1

        # descent direction
        if first_ever:
            d = flat_grad.neg()
            old_dirs, old_stps, ro = [], [], []
            H_diag = 1
        else:
            H_diag = update_history(flat_grad, prev_flat_grad, d, t, old_dirs, old_stps, ro, H_diag, history_size)
            if "al" not in state:
                state["al"] = [None] * history_size
            d = two_loop_direction(flat_grad, old_dirs, old_stps, ro, H_diag, state["al"])

        if prev_flat_grad is None:
            prev_flat_grad = _contiguous_copy(flat_grad)
        else:
            prev_flat_grad.copy_(flat_grad)
        prev_loss = loss

        # step length: the very first iteration is scaled down by the gradient's L1 norm
        t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if first_ever else lr

        gtd = flat_grad.dot(d)
        if gtd > -tolerance_change:  # not a descent direction any more
            break

        ls_func_evals = 0
        if line_search_fn is not None:
            if line_search_fn != "strong_wolfe":
                raise RuntimeError("only 'strong_wolfe' is supported")
            x_init = flat.snapshot()
            loss, flat_grad, t, ls_func_evals = strong_wolfe(
                functools.partial(_directional_evaluate, flat, closure, maximize=maximize),
                x_init, t, d, loss, flat_grad, gtd,
                max_ls=max_eval - current_evals)
            flat.add(t, d)
            opt_cond = flat_grad.abs().max() <= tolerance_grad
        else:
            flat.add(t, d)
            if n_iter != max_iter:  # the last iteration's loss would be thrown away: skip it
                with torch.enable_grad():
                    loss = closure()
                loss = -float(loss) if maximize else float(loss)
                flat_grad = flat.gather_grad()
                opt_cond = flat_grad.abs().max() <= tolerance_grad
                ls_func_evals = 1

        current_evals += ls_func_evals
        state["func_evals"] += ls_func_evals

        # stopping tests, in torch's order
        if n_iter == max_iter or current_evals >= max_eval or opt_cond:
            break
        if d.mul(t).abs().max() <= tolerance_change:  # the step barely moves the params
            break
        if abs(loss - prev_loss) < tolerance_change:  # the loss barely moves
            break

    state["d"] = d
    state["t"] = t
    state["old_dirs"] = old_dirs
    state["old_stps"] = old_stps
    state["ro"] = ro
    state["H_diag"] = H_diag
    state["prev_flat_grad"] = prev_flat_grad
    state["prev_loss"] = prev_loss
    return orig_loss
