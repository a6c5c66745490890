"""Drop-in replacement for torch.optim.RAdam; the math lives in optparity.functional.radam.

Construction checks, defaults, lazy state (`step`, `exp_avg`, `exp_avg_sq`) and the kernel
call match torch.optim.RAdam, so state dicts move freely between the two."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.radam import radam
from optparity.optim._base import (
    TorchStyleOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
)

__all__ = ["RAdam"]


class RAdam(TorchStyleOptimizer):
    """RAdam (rectified Adam), optionally with decoupled weight decay (RAdamW).

    Arguments, defaults and behaviour are those of torch.optim.RAdam."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(radam)
    _state_keys = ("exp_avg", "exp_avg_sq", "step")
    _setstate_defaults = (
        ("foreach", None),
        ("maximize", False),
        ("differentiable", False),
        ("decoupled_weight_decay", False),
        ("capturable", False),
    )
    _sparse_grad_error = "RAdam does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
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
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                decoupled_weight_decay=decoupled_weight_decay,
                differentiable=differentiable,
            ),
        )

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group) -> None:
        beta1, beta2 = group["betas"]
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            has_complex=has_complex,
        )
