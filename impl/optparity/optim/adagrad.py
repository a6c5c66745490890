"""Drop-in torch.optim.Adagrad: same arguments, checks, state layout and results."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional._common import scalar_dtype
from optparity.functional.adagrad import adagrad
from optparity.optim._base import grad_mode_from_differentiable, new_step_counter, step_to_tensor

__all__ = ["Adagrad"]


def _fused_device_types() -> list[str]:
    # device types for which torch ships fused optimizer kernels
    return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", torch._C._get_privateuse1_backend_name()]


def _require_fusable(p: Tensor) -> None:
    kinds = _fused_device_types()
    if p.device.type not in kinds or not torch.is_floating_point(p):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {kinds} but {p.dtype} and {p.device.type}"
        )


def _fresh_state(p: Tensor, fused, initial_accumulator_value) -> dict:
    """`step` counter plus the squared-gradient accumulator filled with the initial value."""
    fill = (
        complex(initial_accumulator_value, initial_accumulator_value)
        if torch.is_complex(p)
        else initial_accumulator_value
    )
    return {
        "step": new_step_counter(p, bool(fused), fused),
        "sum": torch.full_like(p, fill, memory_format=torch.preserve_format),
    }


class Adagrad(Optimizer):
    """Adagrad, as torch.optim.Adagrad (state is created eagerly for every param)."""

    kernel = staticmethod(adagrad)

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
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        # written as "not 0 <= x" so that NaN is rejected too
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}"
            )
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")

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
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
            self._need_device_dtype_check_for_fused = True
            # GradScaler hands us grad_scale/found_inf instead of unscaling grads itself
            self._step_supports_amp_scaling = True

        # Unlike most optimizers, state exists from construction on, for every param;
        # the constructor's initial_accumulator_value is used, not a group's own.
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(_fresh_state(p, group["fused"], initial_accumulator_value))

    def __setstate__(self, state):
        super().__setstate__(state)
        fused = None  # the last group's value is used below, as torch does
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            fused = group.setdefault("fused", None)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    # legacy checkpoints stored `step` as a Python number
                    p_state["step"] = step_to_tensor(
                        p_state["step"], bool(group["fused"]), p.device, fused
                    )

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
            if group["fused"] and getattr(self, "_need_device_dtype_check_for_fused", True):
                _require_fusable(p)
                self._need_device_dtype_check_for_fused = False
            has_sparse_grad |= p.grad.is_sparse
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                # e.g. a param added with add_param_group after construction
                if group["fused"]:
                    _require_fusable(p)
                state.update(
                    _fresh_state(p, group["fused"], self.defaults["initial_accumulator_value"])
                )
            state_sums.append(state["sum"])
            state_steps.append(state["step"])
        return has_sparse_grad, has_complex

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """One Adagrad update over every param group; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            state_sums: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_sparse_grad, has_complex = self._init_group(
                group, params_with_grad, grads, state_sums, state_steps
            )

            self.kernel(
                params_with_grad,
                grads,
                state_sums,
                state_steps,
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

        return loss
