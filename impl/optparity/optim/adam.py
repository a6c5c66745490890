"""Drop-in replacement for torch.optim.Adam.

Construction checks, defaults, lazy state (`step`, `exp_avg`, `exp_avg_sq` and, with
amsgrad, `max_exp_avg_sq`) and the arguments handed to the kernel match torch.optim.Adam,
so state dicts move freely between the two and training continues bit for bit."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import to_scalar
from optparity.functional.adam import adam
from optparity.optim._base import (
    TorchStyleOptimizer,
    check_betas,
    check_fused_param,
    check_lr,
    check_non_negative,
)

__all__ = ["Adam"]


class Adam(TorchStyleOptimizer):
    """Adam, optionally with AMSGrad, maximize, L2 or decoupled weight decay.

    Arguments, defaults and behaviour are those of torch.optim.Adam."""

    kernel = staticmethod(adam)
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    _setstate_defaults = (
        ("amsgrad", False),
        ("maximize", False),
        ("foreach", None),
        ("capturable", False),
        ("differentiable", False),
        ("decoupled_weight_decay", False),
        ("fused", None),
    )
    _sparse_grad_error = (
        "Adam does not support sparse gradients, please consider SparseAdam instead"
    )

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        # Checks run in torch's order so the first failing one gives the same error.
        if isinstance(lr, Tensor) and foreach and not capturable:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        check_lr(lr)
        check_non_negative(eps, "epsilon value")
        check_betas(betas)
        check_non_negative(weight_decay, "weight_decay value")
        both_float = isinstance(betas[0], float) and isinstance(betas[1], float)
        both_tensor = isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)
        if not (both_float or both_tensor):
            raise ValueError("betas must be either both floats or both Tensors")
        for idx in (0, 1):
            if isinstance(betas[idx], Tensor):
                if foreach and not capturable:
                    raise ValueError(
                        f"betas[{idx}] as a Tensor is not supported for capturable=False "
                        "and foreach=True"
                    )
                if betas[idx].numel() != 1:
                    raise ValueError(f"Tensor betas[{idx}] must be 1-element")
        betas = tuple(to_scalar(b) for b in betas)

        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

        if fused:
            self._setup_fused(differentiable, foreach, check_devices_once=False)

    def _step_placement(self, group) -> tuple[bool, bool | None]:
        # `step` lives on the param's device for capturable and for fused
        return bool(group["capturable"] or group["fused"]), group["fused"]

    def _kernel_state_keys(self, group) -> tuple[str | None, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None, "step")

    def _init_state(self, group, p, state) -> None:
        if group["fused"]:
            check_fused_param(p)
        state["step"] = self._new_step(group, p)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _check_state(self, group, state) -> None:
        if group["differentiable"] and state["step"].requires_grad:
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
            raise RuntimeError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )

    def _run_kernel(self, group, tensor_lists, **kwargs) -> None:
        self.kernel(
            *tensor_lists, decoupled_weight_decay=group["decoupled_weight_decay"], **kwargs
        )

    def _step_group(self, group) -> None:
        beta1, beta2 = group["betas"]
        lists, has_complex = self._gather(group)
        self._run_kernel(
            group,
            lists,
            amsgrad=group["amsgrad"],
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
