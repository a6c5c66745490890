"""Drop-in replacement for torch.optim.RMSprop, running optparity's functional kernel."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.rmsprop import rmsprop
from optparity.optim._base import FLAG_DEFAULTS, TorchStyleOptimizer, check_lr, check_non_negative

__all__ = ["RMSprop"]


class RMSprop(TorchStyleOptimizer):
    """RMSprop with torch.optim.RMSprop's constructor, defaults, state layout and results."""

    # the harness swaps this to run bare functional kernels / mutants through the class
    kernel = staticmethod(rmsprop)
    _state_keys = ("square_avg", "grad_avg", "momentum_buffer", "step")
    _setstate_defaults = (("momentum", 0), ("centered", False), *FLAG_DEFAULTS)
    _sparse_grad_error = "RMSprop does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # same checks, order and messages as torch (alpha is checked last)
        check_lr(lr)
        check_non_negative(eps, "epsilon value")
        check_non_negative(momentum, "momentum value")
        check_non_negative(weight_decay, "weight_decay value")
        check_non_negative(alpha, "alpha value")

        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def _kernel_state_keys(self, group) -> tuple[str | None, ...]:
        # optional buffers exist only when their feature is on
        return (
            "square_avg",
            "grad_avg" if group["centered"] else None,
            "momentum_buffer" if group["momentum"] > 0 else None,
            "step",
        )

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group) -> None:
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=group["centered"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=has_complex,
        )
