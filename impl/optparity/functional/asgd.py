"""ASGD (Polyak & Juditsky, 1992): SGD with a decaying step size eta and a running average
`ax` of the iterates that starts after `t0` steps (mu = 1 / max(1, t - t0)).

Bit parity with torch.optim.asgd needs its operation order, and its paths differ: the
for-loop path decays the parameter by (1 - lambd * eta) and then subtracts eta * grad, and
replaces `ax` by a copy of the parameter while mu is 1; the foreach path subtracts
eta * (grad + lambd * param) in one addcmul_ and always averages. The for-loop path computes
the next eta in Python doubles, the non-capturable foreach path in `step`'s tensor dtype."""
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

__all__ = ["asgd"]

_CAPTURABLE_NAMES = "params, mus, etas, and state_steps"


def _single_tensor_asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lambd: float,
    lr: float | Tensor,
    t0: float,
    alpha: float,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        mu = mus[i]
        ax = axs[i]
        eta = etas[i]
        step_t = state_steps[i]

        if capturable:
            check_capturable([param], [step_t], supports_xla=True, companions=([mu], [eta]),
                             names=_CAPTURABLE_NAMES)

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            param = torch.view_as_real(param)
            ax = torch.view_as_real(ax)

        step_t += 1

        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)

        if capturable:
            param.mul_(1 - lambd * eta)
            param.addcmul_(grad, eta, value=-1)
        else:
            eta_value = as_python_number(eta)
            param.mul_(1 - lambd * eta_value)
            param.add_(grad, alpha=-eta_value)

        # Before averaging starts (mu == 1) the average is the iterate itself.
        if capturable or mu.item() != 1:
            ax.add_(param.sub(ax).mul_(mu))
        else:
            ax.copy_(param)

        if capturable:
            eta.copy_(lr / ((1 + lambd * lr * step_t) ** alpha))
            mu.copy_(1 / torch.maximum(step_t - t0, torch.ones_like(step_t)))
        else:
            step = as_python_number(step_t)
            eta.copy_(torch.as_tensor(lr / ((1 + lambd * lr * step) ** alpha)))
            mu.copy_(torch.as_tensor(1 / max(1, step - t0)))


def _multi_tensor_asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lambd: float,
    lr: float | Tensor,
    t0: float,
    alpha: float,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if len(params) == 0:
        return

    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")

    if capturable:
        check_capturable(params, state_steps, supports_xla=False, companions=(mus, etas),
                         names=_CAPTURABLE_NAMES)

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, axs, mus, etas, state_steps],
                                       with_indices=False)
    for (device, _), ((g_params, g_grads, g_axs, g_mus, g_etas, g_steps), _) in groups.items():
        if has_complex:
            view_complex_as_real(g_params, g_grads, g_axs)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        increment_steps(g_steps)

        # update = grad (+ weight_decay * param) + lambd * param, so that
        # param - eta * update == param * (1 - lambd * eta) - eta * grad
        if weight_decay != 0:
            if maximize:
                # g_grads is already our own copy (the negation): update it in place.
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
                update = g_grads
            else:
                update = torch._foreach_add(g_grads, g_params, alpha=weight_decay)
            torch._foreach_add_(update, g_params, alpha=lambd)
        else:
            update = torch._foreach_add(g_grads, g_params, alpha=lambd)
        torch._foreach_addcmul_(g_params, update, g_etas, value=-1)
        del update

        # ax += mu * (param - ax); no lerp: its tensor weight would have to match ax's dtype
        diff = torch._foreach_sub(g_params, g_axs)
        torch._foreach_addcmul_(g_axs, diff, g_mus)
        del diff

        if capturable:
            # mu = 1 / max(t - t0, 1)
            new_mus = torch._foreach_sub(g_steps, t0)
            torch._foreach_maximum_(new_mus, 1.0)
            torch._foreach_reciprocal_(new_mus)
            torch._foreach_copy_(g_mus, new_mus)
            del new_mus

            # eta = lr / (1 + lambd * lr * t)^alpha
            new_etas = torch._foreach_mul(g_steps, lambd)
            torch._foreach_mul_(new_etas, lr)
            torch._foreach_add_(new_etas, 1)
            torch._foreach_pow_(new_etas, alpha)
            torch._foreach_reciprocal_(new_etas)
            torch._foreach_mul_(new_etas, lr)
            torch._foreach_copy_(g_etas, new_etas)
        else:
            # eta from the step tensor itself (its dtype), mu from its Python value
            new_etas = [
                torch.as_tensor(lr / ((1 + lambd * lr * s) ** alpha), device=device)
                for s in g_steps
            ]
            new_mus = [
                torch.as_tensor(1 / max(1, as_python_number(s) - t0), device=device)
                for s in g_steps
            ]
            torch._foreach_copy_(g_etas, new_etas)
            torch._foreach_copy_(g_mus, new_mus)


def asgd(
    params: list[Tensor],
    grads: list[Tensor],
    axs: list[Tensor],
    mus: list[Tensor],
    etas: list[Tensor],
    state_steps: list[Tensor],
    # Positional-with-default flags kept in torch's order for API compatibility.
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    lambd: float,
    lr: float | Tensor,
    t0: float,
    alpha: float,
    weight_decay: float,
) -> None:
    """Functional ASGD step over lists of tensors (see optparity.optim.ASGD)."""
    # torch's asgd does not check that state_steps are tensors
    impl = pick_kernel(_single_tensor_asgd, _multi_tensor_asgd, params, state_steps, foreach,
                       differentiable, check_steps=False)
    impl(
        params,
        grads,
        axs,
        mus,
        etas,
        state_steps,
        lambd=lambd,
        lr=lr,
        t0=t0,
        alpha=alpha,
        weight_decay=weight_decay,
        maximize=maximize,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
