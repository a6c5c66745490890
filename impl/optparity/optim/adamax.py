"""Drop-in replacement for torch.optim.Adamax; the math lives in optparity.functional.adamax."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.adamax import adamax
from optparity.optim._base import (
    FLAG_DEFAULTS,
    TorchStyleOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
)

__all__ = ["Adamax"]


class Adamax(TorchStyleOptimizer):
    """Adamax (Adam with an infinity-norm second moment), state-dict compatible with torch's."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(adamax)
    _state_keys = ("exp_avg", "exp_inf", "step")
    _setstate_defaults = FLAG_DEFAULTS
    _sparse_grad_error = "Adamax does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        # Checked in torch's order so the first failing message is the same.
        check_lr(lr)
        check_non_negative(eps, "epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "weight_decay value")

        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                capturable=capturable,
            ),
        )

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group) -> None:
        beta1, beta2 = group["betas"]
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=has_complex,
        )
