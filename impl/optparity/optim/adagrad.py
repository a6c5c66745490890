"""Drop-in torch.optim.Adagrad: same arguments, checks, state layout and results."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import scalar_dtype
from optparity.functional.adagrad import adagrad
from optparity.optim._base import (
    TorchStyleOptimizer,
    check_fused_param,
    check_lr,
    check_non_negative,
)

__all__ = ["Adagrad"]


class Adagrad(TorchStyleOptimizer):
    """Adagrad, as torch.optim.Adagrad (state is created eagerly for every param)."""

    kernel = staticmethod(adagrad)
    _state_keys = ("sum", "step")
    _setstate_defaults = (
        ("foreach", None),
        ("maximize", False),
        ("differentiable", False),
        ("fused", None),
    )
    _capture_health_check = False

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_lr(lr)
        check_non_negative(lr_decay, "lr_decay value")
        check_non_negative(weight_decay, "weight_decay value")
        check_non_negative(initial_accumulator_value, "initial_accumulator_value value")
        check_non_negative(eps, "epsilon value")

        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            fused=fused,
        )
        super().__init__(params, defaults)

        if fused:
            self._setup_fused(differentiable, foreach, check_devices_once=True)

        # Unlike most optimizers, state exists from construction on, for every param;
        # the constructor's initial_accumulator_value is used, not a group's own.
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(self._fresh_state(group, p, initial_accumulator_value))

    def _fresh_state(self, group, p: Tensor, initial_accumulator_value) -> dict:
        """`step` counter plus the squared-gradient accumulator filled with the initial value."""
        fill = (
            complex(initial_accumulator_value, initial_accumulator_value)
            if torch.is_complex(p)
            else initial_accumulator_value
        )
        return {
            "step": self._new_step(group, p),
            "sum": torch.full_like(p, fill, memory_format=torch.preserve_format),
        }

    def _step_placement(self, group) -> tuple[bool, bool | None]:
        # `step` lives on the param's device for fused only (Adagrad has no capturable)
        return bool(group["fused"]), group["fused"]

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch then converts whatever is still not a tensor, using the last group's `fused`
        fused = self.param_groups[-1]["fused"] if self.param_groups else None
        all_states = list(self.state.values())
        if not (all_states and torch.is_tensor(all_states[0]["step"])):
            for s in all_states:
                s["step"] = torch.tensor(float(s["step"]), dtype=scalar_dtype(fused))

    def share_memory(self) -> None:
        """Move every accumulator (`sum`) to shared memory."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _init_group(self, group, params_with_grad, grads, state_sums, state_steps):
        has_sparse_grad = False
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            # fused kernels need float params on a supported device; checked once
            if group["fused"]:
                self._check_fused_device_once(p)
            has_sparse_grad |= p.grad.is_sparse
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                # e.g. a param added with add_param_group after construction
                if group["fused"]:
                    check_fused_param(p)
                state.update(
                    self._fresh_state(group, p, self.defaults["initial_accumulator_value"])
                )
            state_sums.append(state["sum"])
            state_steps.append(state["step"])
        return has_sparse_grad, has_complex

    def _step_group(self, group) -> None:
        lists, (has_sparse_grad, has_complex) = self._gather(group)
        self.kernel(
            *lists,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            has_complex=has_complex,
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )
