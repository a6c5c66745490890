"""Drop-in replacement for torch.optim.Adadelta, running optparity's functional kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.adadelta import adadelta
from optparity.optim._base import FLAG_DEFAULTS, TorchStyleOptimizer, check_lr, check_non_negative

__all__ = ["Adadelta"]


class Adadelta(TorchStyleOptimizer):
    """Adadelta with torch.optim.Adadelta's constructor, defaults, state layout and results."""

    # the harness swaps this to run bare functional kernels / mutants through the class
    kernel = staticmethod(adadelta)
    _state_keys = ("square_avg", "acc_delta", "step")
    _setstate_defaults = FLAG_DEFAULTS
    _sparse_grad_error = "Adadelta does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # same checks, order and messages as torch
        check_lr(lr)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        check_non_negative(eps, "epsilon value")
        check_non_negative(weight_decay, "weight_decay value")

        defaults = dict(
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            capturable=capturable,
            foreach=foreach,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["acc_delta"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group) -> None:
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            lr=group["lr"],
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=has_complex,
        )
