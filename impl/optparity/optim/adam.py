"""Drop-in replacement for torch.optim.Adam.

Construction checks, defaults, lazy state (`step`, `exp_avg`, `exp_avg_sq` and, with
amsgrad, `max_exp_avg_sq`) and the arguments handed to the kernel match torch.optim.Adam,
so state dicts move freely between the two and training continues bit for bit."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional._common import to_scalar
from optparity.functional.adam import adam
from optparity.optim._base import (
    grad_mode_from_differentiable,
    new_step_counter,
    step_to_tensor,
)

__all__ = ["Adam"]


def _fused_device_types() -> list[str]:
    # Same list and order as torch (it appears in the error message).
    return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", torch._C._get_privateuse1_backend_name()]


def _check_fused_param(p: Tensor) -> None:
    kinds = _fused_device_types()
    if not (p.device.type in kinds and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {kinds} but {p.dtype} and {p.device.type}"
        )


class Adam(Optimizer):
    """Adam, optionally with AMSGrad, maximize, L2 or decoupled weight decay.

    Arguments, defaults and behaviour are those of torch.optim.Adam."""

    kernel = staticmethod(adam)

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
        if isinstance(lr, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for idx in (0, 1):
            if not 0.0 <= betas[idx] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {idx}: {betas[idx]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
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
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            # Lets GradScaler hand us grad_scale/found_inf instead of unscaling itself.
            self._step_supports_amp_scaling = True
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            fused = group.setdefault("fused", None)
            on_device = bool(group["capturable"] or group["fused"])
            for p in group["params"]:
                p_state = self.state.get(p, [])
                # Very old checkpoints stored `step` as a Python number.
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = step_to_tensor(p_state["step"], on_device, p.device, fused)

    def _init_group(
        self,
        group,
        params_with_grad,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
    ) -> bool:
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            if p.grad.is_sparse:
                raise RuntimeError(
                    "Adam does not support sparse gradients, please consider SparseAdam instead"
                )
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                if group["fused"]:
                    _check_fused_param(p)
                # `step` stays a CPU scalar unless capturable/fused want it on the param's device.
                state["step"] = new_step_counter(
                    p, bool(group["capturable"] or group["fused"]), group["fused"]
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )

            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            if group["foreach"] and torch.is_tensor(group["lr"]) and not group["capturable"]:
                raise RuntimeError(
                    "lr as a Tensor is not supported for capturable=False and foreach=True"
                )
            state_steps.append(state["step"])
        return has_complex

    def _run_kernel(self, group, tensor_lists, **kwargs) -> None:
        self.kernel(
            *tensor_lists, decoupled_weight_decay=group["decoupled_weight_decay"], **kwargs
        )

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """Perform one optimization step; `closure` re-evaluates the model and returns the loss."""
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            beta1, beta2 = group["betas"]

            has_complex = self._init_group(
                group,
                params_with_grad,
                grads,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                state_steps,
            )

            self._run_kernel(
                group,
                (params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps),
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

        return loss
