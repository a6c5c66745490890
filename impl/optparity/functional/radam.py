"""RAdam (Liu et al., 2019): Adam whose adaptive step is switched on, and scaled by the
variance rectification term, only once the approximated SMA length rho_t exceeds 5; before
that the step is plain bias-corrected momentum SGD.

Bit parity with torch.optim.radam needs its operation order, and its paths differ: the
for-loop path multiplies the bias-corrected momentum by lr, the adaptive lr and the
rectification; the foreach path folds everything into one per-parameter multiplier
(1 / ((sqrt(v) + eps) / (sqrt(bc2) * step size)) plus the unrectified step size) applied with
one addcmul_; an unrectified step divides by a -0.0 step size there, so the adaptive term's
reciprocal is -0.0 and only the plain step size remains."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    as_python_number,
    check_capturable,
    check_state_steps,
    group_by_device_and_dtype,
    increment_steps,
    pick_kernel,
    to_scalar,
    view_complex_as_real,
)

__all__ = ["radam"]


def _single_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    differentiable: bool,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        m = exp_avgs[i]
        v = exp_avg_sqs[i]
        step_t = state_steps[i]

        if capturable:
            check_capturable([param], [step_t], supports_xla=True)

        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            m = torch.view_as_real(m)
            v = torch.view_as_real(v)

        step_t += 1
        step = step_t if capturable else as_python_number(step_t)

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        corrected_m = m / bias_correction1

        # maximum and current length of the approximated simple moving average
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2

        def rectification():
            return (
                (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            ) ** 0.5

        def adaptive_lr():
            v_sqrt = v.sqrt()
            # differentiable: keep the sqrt node intact for autograd
            v_sqrt = v_sqrt.add(eps) if differentiable else v_sqrt.add_(eps)
            return (bias_correction2**0.5) / v_sqrt

        if capturable:
            # No host sync on rho_t: both branches computed, one selected on device.
            update = torch.where(rho_t > 5.0, rectification() * adaptive_lr(), 1.0)
            param.add_(corrected_m * lr * update, alpha=-1.0)
        elif rho_t > 5.0:
            param.add_(corrected_m * lr * adaptive_lr() * rectification(), alpha=-1.0)
        else:
            param.add_(corrected_m * lr, alpha=-1.0)


def _multi_tensor_radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    differentiable: bool,
    maximize: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if len(params) == 0:
        return

    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")

    if capturable:
        check_capturable(params, state_steps, supports_xla=False)

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, state_steps],
                                       with_indices=False)
    for (g_params, g_grads, g_m, g_v, g_steps), _ in groups.values():
        # Here the step is counted before the real views are taken.
        increment_steps(g_steps)

        if has_complex:
            view_complex_as_real(g_params, g_grads, g_m, g_v)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        rho_inf = 2 / (1 - beta2) - 1

        if capturable:
            # rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t), on device
            one_minus_b2t = torch._foreach_pow(beta2, g_steps)
            torch._foreach_neg_(one_minus_b2t)
            torch._foreach_add_(one_minus_b2t, 1)
            rho_ts = torch._foreach_pow(beta2, g_steps)
            torch._foreach_mul_(rho_ts, g_steps)
            torch._foreach_mul_(rho_ts, 2)
            torch._foreach_div_(rho_ts, one_minus_b2t)
            torch._foreach_neg_(rho_ts)
            torch._foreach_add_(rho_ts, rho_inf)
            del one_minus_b2t
        else:
            rho_ts = [
                rho_inf
                - 2
                * as_python_number(s)
                * (beta2 ** as_python_number(s))
                / (1 - beta2 ** as_python_number(s))
                for s in g_steps
            ]

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(g_params, 1 - lr * weight_decay)
            elif maximize:
                # g_grads is already our own copy (the negation): update it in place.
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        torch._foreach_lerp_(g_m, g_grads, 1 - beta1)
        torch._foreach_mul_(g_v, beta2)
        torch._foreach_addcmul_(g_v, g_grads, g_grads, 1 - beta2)
        del g_grads

        if capturable:
            # rect = sqrt((rho_t-4)(rho_t-2) rho_inf / (rho_t (rho_inf-4)(rho_inf-2))), 0 when rho_t <= 5
            num = torch._foreach_sub(rho_ts, 4)
            minus2 = torch._foreach_sub(rho_ts, 2)
            torch._foreach_mul_(num, minus2)
            del minus2
            torch._foreach_mul_(num, rho_inf)
            rho_inf_terms = (rho_inf - 4) * (rho_inf - 2)
            den = torch._foreach_mul(rho_ts, rho_inf_terms)
            torch._foreach_div_(num, den)
            del den
            torch._foreach_sqrt_(num)
            rect = [torch.where(r > 5.0, n, 0.0) for n, r in zip(num, rho_ts, strict=True)]
            del num, rho_ts

            # -lr / (1 - beta1^t) where unrectified, else -0.0 / ... (0 * lr)
            unrect_step = [torch.where(r > 0, 0.0, 1.0) for r in rect]
            torch._foreach_mul_(unrect_step, lr)
            bias_correction1 = torch._foreach_pow(beta1, g_steps)
            torch._foreach_neg_(bias_correction1)
            torch._foreach_add_(bias_correction1, 1)
            torch._foreach_div_(unrect_step, bias_correction1)
            torch._foreach_neg_(unrect_step)

            # -sqrt(1 - beta2^t) * lr * rect / (1 - beta1^t)
            scale = torch._foreach_pow(beta2, g_steps)
            torch._foreach_neg_(scale)
            torch._foreach_add_(scale, 1)
            torch._foreach_sqrt_(scale)
            torch._foreach_mul_(scale, lr)
            torch._foreach_mul_(scale, rect)
            del rect
            torch._foreach_neg_(scale)
            torch._foreach_div_(scale, bias_correction1)
            del bias_correction1
        else:
            # An int 0 (not 0.0) where unrectified, as torch has it: it decides the zeros' signs.
            rect = [
                ((r - 4) * (r - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * r)) ** 0.5
                if r > 5
                else 0
                for r in rho_ts
            ]
            unrectified = [0 if r > 0 else 1.0 for r in rect]
            bias_correction1 = [1 - beta1 ** as_python_number(s) for s in g_steps]
            unrect_step = [
                (lr * u / bc) * -1 for u, bc in zip(unrectified, bias_correction1, strict=True)
            ]
            scale = [
                ((1 - beta2 ** as_python_number(s)) ** 0.5) * (lr * r / bc) * -1
                for s, r, bc in zip(g_steps, rect, bias_correction1, strict=True)
            ]

        # multiplier = sqrt(bc2) * rect step size / (sqrt(v) + eps) + unrectified step size
        multiplier = torch._foreach_sqrt(g_v)
        torch._foreach_add_(multiplier, eps)
        torch._foreach_div_(multiplier, scale)
        torch._foreach_reciprocal_(multiplier)
        torch._foreach_add_(multiplier, unrect_step)
        torch._foreach_addcmul_(g_params, g_m, multiplier)


def radam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    # Positional-with-default flags kept in torch's order for API compatibility.
    decoupled_weight_decay: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    maximize: bool = False,
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
) -> None:
    """Functional RAdam step over lists of tensors (see optparity.optim.RAdam)."""
    # torch checks the steps even while compiling
    check_state_steps(state_steps, skip_when_compiling=False)
    impl = pick_kernel(_single_tensor_radam, _multi_tensor_radam, params, state_steps, foreach,
                       differentiable, check_steps=False)
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
