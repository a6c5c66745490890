"""The conditions an edge case runs under (matrix.Case fields): torch intra-op threads, the
default dtype, and steps driven by torch.amp.GradScaler. The runner enters `applied(case)` around
a case and steps each side with `step(case, driver, grads, n)`."""
from __future__ import annotations

import contextlib

import torch

from optparity.harness.candidates import NotApplicable

# GradScaler settings both sides get: a scale that fp16 gradients overflow now and then, and a
# short growth interval so growth and backoff both happen within a case.
AMP_INIT_SCALE = 2.0 ** 14
AMP_GROWTH_INTERVAL = 3
# Steps whose gradients get an infinity before scaling: found_inf, a skipped step and a backoff.
AMP_INF_STEPS = (4, 9)


@contextlib.contextmanager
def applied(case):
    """Set the case's thread count and default dtype for its duration, then restore them."""
    threads, default = torch.get_num_threads(), torch.get_default_dtype()
    try:
        if getattr(case, "threads", 1) != 1:
            torch.set_num_threads(case.threads)
        if getattr(case, "default_dtype", None) is not None:
            torch.set_default_dtype(case.default_dtype)
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default)


def scaler_of(driver) -> torch.amp.GradScaler:
    scaler = driver.__dict__.get("_optparity_scaler")
    if scaler is None:
        scaler = torch.amp.GradScaler("cpu", init_scale=AMP_INIT_SCALE, growth_interval=AMP_GROWTH_INTERVAL)
        driver._optparity_scaler = scaler
    return scaler


def step(case, driver, grads, n: int):
    """One step of `driver`: its own step, or under amp the GradScaler recipe (scaled gradients
    into .grad, scaler.step, scaler.update). Returns what the step returned."""
    if getattr(case, "amp_recipe", None):  # the recipes of harness/amp.py
        from optparity.harness import amp

        return amp.step(case, driver, grads, n)
    if not getattr(case, "amp", False):
        return driver.step(grads, n)
    opt = getattr(driver, "opt", None)
    if opt is None or getattr(driver, "closure_objective", None) is not None:
        raise NotApplicable("GradScaler drives torch.optim-style optimizers stepped without a closure")
    scaler = scaler_of(driver)
    for p, g in zip(driver.pset.params, poisoned(grads, n)):
        p.grad = None if g is None else scaled(scaler, g)
    out = scaler.step(opt)
    scaler.update()
    return out


def scaled(scaler, g):
    """`g` as the backward of a scaled loss gives it: times the scale, in g's own dtype (a 0-dim
    low-precision gradient times the float32 scale would otherwise come back float32)."""
    return scaler.scale(g).to(g.dtype)


def poisoned(grads, n: int) -> list:
    """`grads`, with an infinity in the first nonempty one at the steps AMP_INF_STEPS (a copy;
    a sparse one gets it in its first value)."""
    first = _first_with_grad(grads) if n in AMP_INF_STEPS else -1
    out = list(grads)
    if first >= 0:
        g = grads[first].clone()
        values = g._values() if g.is_sparse else g
        values[(0,) * values.dim()] = float("inf")
        out[first] = g
    return out


def _first_with_grad(grads) -> int:
    return next((i for i, g in enumerate(grads) if g is not None and (g._nnz() if g.is_sparse else g.numel())), -1)
