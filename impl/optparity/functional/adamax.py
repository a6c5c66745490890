"""Adamax: Adam with the second moment replaced by an exponentially decayed infinity norm.

Bit parity with torch.optim.adamax depends on doing the same floating-point operations in the
same order, so the for-loop and foreach paths below deliberately differ where torch's differ
(e.g. a tensor lr is divided as a tensor in the for-loop path but as a Python float in the
foreach path).
"""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    as_python_number,
    check_capturable,
    group_by_device_and_dtype,
    increment_steps,
    pick_kernel,
    to_scalar,
    view_complex_as_real,
)

__all__ = ["adamax"]


def _single_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for idx, param in enumerate(params):
        g = grads[idx]
        if maximize:
            g = -g
        m = exp_avgs[idx]
        u = exp_infs[idx]
        step = state_steps[idx]

        if capturable:
            check_capturable([param], [step], supports_xla=True)

        step += 1

        # L2 penalty goes into the (complex) gradient before any real view is taken.
        if weight_decay != 0:
            g = g.add(param, alpha=weight_decay)

        if torch.is_complex(param):
            param = torch.view_as_real(param)
            g = torch.view_as_real(g)
            m = torch.view_as_real(m)
            u = torch.view_as_real(u)

        m.lerp_(g, 1 - beta1)

        # u <- max(beta2 * u, |g| + eps)
        if differentiable:
            # torch.maximum(out=...) is not differentiable; stack and reduce instead.
            candidates = torch.cat(
                [u.mul_(beta2).unsqueeze(0), g.abs().add_(eps).unsqueeze_(0)], 0
            )
            u.copy_(torch.amax(candidates, 0, keepdim=False))
        else:
            torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)

        if capturable:
            # Everything stays on device: denominator carries -(1 - beta1^t) / lr.
            neg_bc = beta1**step - 1
            neg_bc.div_(lr)
            param.addcdiv_(m, u * neg_bc)
        else:
            # Python-float bias correction; lr may still be a tensor here (tensor division).
            bias_correction = 1 - beta1 ** as_python_number(step)
            scaled_lr = lr / bias_correction
            param.addcdiv_(m, u, value=-scaled_lr)


def _multi_tensor_adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")

    if len(params) == 0:
        return

    if capturable:
        check_capturable(params, state_steps, supports_xla=False)

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, exp_avgs, exp_infs, state_steps])
    for (g_params, g_grads, g_avgs, g_infs, g_steps), _ in groups.values():
        if has_complex:
            view_complex_as_real(g_params, g_grads, g_avgs, g_infs)

        # `owned` tracks whether g_grads is a fresh buffer we may overwrite in place.
        owned = False
        if maximize:
            g_grads = torch._foreach_neg(g_grads)
            owned = True

        increment_steps(g_steps)

        if weight_decay != 0:
            if owned:
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)
                owned = True

        torch._foreach_lerp_(g_avgs, g_grads, 1 - beta1)

        torch._foreach_mul_(g_infs, beta2)
        if owned:
            torch._foreach_abs_(g_grads)
        else:
            # Never write into the caller's gradients.
            g_grads = torch._foreach_abs(g_grads)
        torch._foreach_add_(g_grads, eps)
        torch._foreach_maximum_(g_infs, g_grads)

        if capturable:
            # (beta1^t - 1) / lr, then param += m / (u * that)
            neg_bcs = torch._foreach_pow(beta1, g_steps)
            torch._foreach_sub_(neg_bcs, 1)
            torch._foreach_div_(neg_bcs, lr)
            denoms = torch._foreach_mul(g_infs, neg_bcs)
            torch._foreach_addcdiv_(g_params, g_avgs, denoms)
        else:
            lr_value = as_python_number(lr)
            step_sizes = []
            for s in g_steps:
                bc = 1 - beta1 ** as_python_number(s)
                step_sizes.append((lr_value / bc) * -1)
            torch._foreach_addcdiv_(g_params, g_avgs, g_infs, step_sizes)


def adamax(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_infs: list[Tensor],
    state_steps: list[Tensor],
    # Positional-with-default flags kept in torch's order for API compatibility.
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
) -> None:
    """Functional Adamax step over lists of tensors (see optparity.optim.Adamax)."""
    impl = pick_kernel(
        _single_tensor_adamax, _multi_tensor_adamax, params, state_steps, foreach, differentiable
    )
    impl(
        params,
        grads,
        exp_avgs,
        exp_infs,
        state_steps,
        eps=eps,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        maximize=maximize,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
