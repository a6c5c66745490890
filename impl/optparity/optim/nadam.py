"""Drop-in replacement for torch.optim.NAdam; the math lives in optparity.functional.nadam.

Construction checks, defaults, lazy state (`step`, `mu_product`, `exp_avg`, `exp_avg_sq`) and
the kernel call match torch.optim.NAdam, so state dicts move freely between the two."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import scalar_dtype
from optparity.functional.nadam import nadam
from optparity.optim._base import (
    TorchStyleOptimizer,
    check_betas,
    check_lr,
    check_non_negative,
)

__all__ = ["NAdam"]


class NAdam(TorchStyleOptimizer):
    """NAdam (Adam with Nesterov momentum), optionally with decoupled weight decay (NAdamW).

    Arguments, defaults and behaviour are those of torch.optim.NAdam."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(nadam)
    _state_keys = ("exp_avg", "exp_avg_sq", "mu_product", "step")
    _setstate_defaults = (
        ("maximize", False),
        ("foreach", None),
        ("capturable", False),
        ("differentiable", False),
        ("decoupled_weight_decay", False),
    )
    _sparse_grad_error = "NAdam does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        check_non_negative(momentum_decay, "momentum_decay value")

        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                momentum_decay=momentum_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
            ),
        )

    def _legacy_steps_to_tensors(self, group) -> None:
        super()._legacy_steps_to_tensors(group)
        # old checkpoints also stored mu_product as a Python number
        for p in group["params"]:
            p_state = self.state.get(p, [])
            if len(p_state) != 0 and not torch.is_tensor(p_state["mu_product"]):
                where = {"device": p.device} if group["capturable"] else {}
                p_state["mu_product"] = torch.tensor(
                    p_state["mu_product"], dtype=scalar_dtype(), **where
                )

    def _init_state(self, group, p, state) -> None:
        # step and mu_product stay on the CPU unless capturable (no kernel launch per read)
        state["step"] = self._new_step(group, p)
        if group["capturable"]:
            state["mu_product"] = torch.ones((), dtype=scalar_dtype(), device=p.device)
        else:
            state["mu_product"] = torch.tensor(1.0, dtype=scalar_dtype())
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
            momentum_decay=group["momentum_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            has_complex=has_complex,
        )
