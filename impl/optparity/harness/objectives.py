"""Objectives for closure-only optimizers (kind "closure", e.g. LBFGS).

Such an optimizer cannot be fed gradients: every step is `step(closure)` and the closure may be
called many times (line search). The harness gives both sides the same deterministic objective
of their own parameters, a weighted quadratic plus a quartic whose minimum moves a little every
step (so every step has work to do), with loss and gradients recomputed by autograd on each
call. Besides parameters and state, the runner compares the loss each step returns and the
number of closure calls it made.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.harness import algorithms
from optparity.harness.params import ParamSet

# The minimum moves by this much per step.
DRIFT = 0.05


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _flat_real(t: Tensor) -> list[Tensor]:
    # real then imaginary parts: view_as_real's backward would need an even offset in the
    # flat vector's gradient
    return [t.real.reshape(-1), t.imag.reshape(-1)] if t.is_complex() else [t.reshape(-1)]


class ClosureObjective:
    """sum(w * (x - c - DRIFT * step)**2) + 0.25 * sum(x**4), x every param flattened into one
    vector (complex ones as real and imaginary parts). w and c depend only on the params' sizes and dtype, so
    the candidate's and the reference's copies get identical objectives."""

    def __init__(self, pset: ParamSet):
        self.pset = pset
        # one flat vector of every param (complex ones as real pairs): few autograd nodes
        n = sum(_real(p).numel() for p in pset.params)
        dtype = _real(pset.params[0]).dtype if pset.params else torch.float32
        device = pset.params[0].device if pset.params else None
        # made on the CPU and moved: the same numbers on every device
        self.weights = torch.linspace(0.5, 2.0, n, dtype=dtype).to(device)
        self.centres = torch.linspace(-1.0, 1.0, n, dtype=dtype).to(device)
        self.step_calls = 0  # closure calls during the last step
        self.total_calls = 0
        self._target = self.centres

    def loss(self) -> Tensor:
        x = torch.cat([piece for p in self.pset.params for piece in _flat_real(p)])
        return (self.weights * (x - self._target).square()).sum() + 0.25 * x.pow(4).sum()

    def closure(self) -> Tensor:
        self.step_calls += 1
        for p in self.pset.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return loss

    def step(self, opt, step: int):
        """opt.step(closure) for harness step `step` (1-based); returns what it returned."""
        self._target = self.centres + DRIFT * step
        self.step_calls = 0
        try:
            out = opt.step(self.closure)
        finally:
            self.total_calls += self.step_calls
        # the loss keeps its graph alive otherwise; its value is what is compared
        return out.detach() if isinstance(out, Tensor) else out


def attach(driver, algorithm: str | None):
    """Give `driver` a ClosureObjective when `algorithm` can only be stepped with a closure."""
    described = algorithms.SPECS.get(algorithm) if algorithm else None
    if described is not None and described.kind == "closure":
        driver.closure_objective = ClosureObjective(driver.pset)
    return driver


def closure_calls_differ(cand, ref) -> str | None:
    """A message when the two drivers' last steps called their closures a different number of times."""
    oc, orf = getattr(cand, "closure_objective", None), getattr(ref, "closure_objective", None)
    if oc is None or orf is None or oc.step_calls == orf.step_calls:
        return None
    return (f"step(closure) called the closure {oc.step_calls} time(s), the reference "
            f"{orf.step_calls} (totals so far {oc.total_calls} vs {orf.total_calls})")
