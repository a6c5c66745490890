"""Drop-in replacement for torch.optim.LBFGS; the math lives in optparity.functional.lbfgs.

The class flattens the parameters (complex ones as real pairs, a missing grad as zeros) and
keeps torch's state layout: one global state registered on the first parameter (func_evals,
n_iter, d, t, old_dirs, old_stps, ro, H_diag, prev_flat_grad, prev_loss, al), so state dicts
load into either implementation. On torch 2.14+ (optparity.versions) it has torch's keyword-only
`maximize` (a group key; the gradient and the losses negated) and steps with no parameters by
only calling the closure, as that torch does; on 2.13 neither, as 2.13.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity import versions
from optparity.functional._common import to_scalar
from optparity.functional.lbfgs import FlatParams, lbfgs
from optparity.optim._base import check_lr

__all__ = ["LBFGS"]

# torch 2.14 added maximize and the empty-parameter step
SINCE_2_14 = versions.at_least("2.14")
_UNSET = object()


class LBFGS(Optimizer):
    """L-BFGS with an optional strong-Wolfe line search; one parameter group only, and every
    step needs a closure that recomputes the loss and the gradients."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(lbfgs)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        maximize=_UNSET,
    ) -> None:
        if maximize is not _UNSET and not SINCE_2_14:  # as 2.13's signature, which lacks it
            raise TypeError("LBFGS.__init__() got an unexpected keyword argument 'maximize'")
        check_lr(lr)
        if max_eval is None:
            max_eval = max_iter * 5 // 4
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )
        if SINCE_2_14:
            defaults["maximize"] = False if maximize is _UNSET else maximize
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups)")
        self._params = self.param_groups[0]["params"]
        self._numel_cache = None

    # --- the parameters as one flat vector (names as torch's, which some users reach for)

    def _numel(self) -> int:
        if self._numel_cache is None:
            self._numel_cache = sum(p.numel() * (2 if torch.is_complex(p) else 1) for p in self._params)
        return self._numel_cache

    def _gather_flat_grad(self) -> Tensor:
        pieces = []
        for p in self._params:
            g = p.grad
            if g is None:
                flat = p.new_zeros(p.numel())
            else:
                # view, not reshape: a grad that cannot be viewed flat is refused as torch does
                flat = (g.to_dense() if g.is_sparse else g).view(-1)
            pieces.append(torch.view_as_real(flat).view(-1) if torch.is_complex(flat) else flat)
        flat_grad = torch.cat(pieces, 0)
        if SINCE_2_14 and self.param_groups[0].get("maximize", False):
            flat_grad.neg_()
        return flat_grad

    def _add_grad(self, step_size, update: Tensor) -> None:
        offset = 0
        for p in self._params:
            target = torch.view_as_real(p) if torch.is_complex(p) else p
            n = target.numel()
            target.add_(update[offset: offset + n].view_as(target), alpha=step_size)
            offset += n
        if offset != self._numel():
            raise AssertionError(f"Expected offset {offset} to equal {self._numel()}")

    def _clone_param(self) -> list[Tensor]:
        return [p.clone(memory_format=torch.contiguous_format) for p in self._params]

    def _set_param(self, params_data) -> None:
        for p, saved in zip(self._params, params_data, strict=True):
            p.copy_(saved)

    @torch.no_grad()
    def step(self, closure):  # type: ignore[override]
        """One optimization step of up to max_iter iterations.

        Args:
            closure (Callable): reevaluates the model (zeroing and recomputing the
                gradients) and returns the loss.
        """
        if len(self.param_groups) != 1:
            raise AssertionError(f"Expected exactly one param_group, but got {len(self.param_groups)}")
        # the closure always runs with grad enabled, even inside this no_grad step
        closure = torch.enable_grad()(closure)
        if SINCE_2_14 and not self._params:  # nothing to optimize: the closure's loss, no state
            return closure()
        group = self.param_groups[0]
        flat = FlatParams(self._gather_flat_grad, self._add_grad, self._clone_param, self._set_param)
        # group keys are read in torch's order (a missing one names the same key)
        hyper = dict(
            lr=to_scalar(group["lr"]),
            max_iter=group["max_iter"],
            max_eval=group["max_eval"],
            tolerance_grad=group["tolerance_grad"],
            tolerance_change=group["tolerance_change"],
            line_search_fn=group["line_search_fn"],
            history_size=group["history_size"],
        )
        if SINCE_2_14:
            hyper["maximize"] = group.get("maximize", False)
        # LBFGS's state is global; it lives on the first param so load_state_dict casts it
        return self.kernel(flat, closure, self.state[self._params[0]], **hyper)


def _public_signature():
    """torch's signature on the installed release: keyword-only maximize=False from 2.14, none before."""
    import inspect

    sig = inspect.signature(LBFGS.__init__)
    params = [p for p in sig.parameters.values() if p.name != "maximize"]
    if SINCE_2_14:
        params.append(sig.parameters["maximize"].replace(default=False))
    return sig.replace(parameters=params)


LBFGS.__init__.__signature__ = _public_signature()
