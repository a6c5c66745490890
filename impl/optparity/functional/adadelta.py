"""Adadelta (Zeiler, 2012): per-element step sizes from running averages of squared
gradients and squared updates.

The operation order below mirrors torch.optim.adadelta step for step, because bit
identity with torch depends on it (e.g. `add(eps).sqrt_()` on both averages, the
update built in place as sqrt(acc+eps) / sqrt(sq+eps) * grad)."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    check_capturable,
    group_by_device_and_dtype,
    increment_steps,
    pick_kernel,
    to_scalar,
    view_complex_as_real,
)

__all__ = ["adadelta"]


def _single_tensor_adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if capturable:
        # Adadelta's device list leaves out XLA, on both paths
        check_capturable(params, state_steps, supports_xla=False)

    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for p, g, sq, acc, step in zip(params, grads, square_avgs, acc_deltas, state_steps, strict=True):
        step += 1
        if maximize:
            g = -g
        if weight_decay != 0:
            # out of place: the caller's grad must stay untouched
            g = g.add(p, alpha=weight_decay)

        complex_param = torch.is_complex(p)
        if complex_param:
            # the averages work on (re, im) pairs; the param itself stays complex
            sq = torch.view_as_real(sq)
            acc = torch.view_as_real(acc)
            g = torch.view_as_real(g)

        sq.mul_(rho).addcmul_(g, g, value=1 - rho)
        denom = sq.add(eps).sqrt_()
        update = acc.add(eps).sqrt_()
        if differentiable:
            # keep the autograd graph shaped like torch's
            update = update.clone()
        update.div_(denom).mul_(g)
        acc.mul_(rho).addcmul_(update, update, value=1 - rho)

        if complex_param:
            update = torch.view_as_complex(update)
        p.add_(update, alpha=-lr)


def _multi_tensor_adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if capturable:
        # Adadelta's device list leaves out XLA, on both paths
        check_capturable(params, state_steps, supports_xla=False)
    if not params:
        return

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, square_avgs, acc_deltas, state_steps])
    for (g_params, g_grads, g_sqs, g_accs, g_steps), _ in groups.values():
        if has_complex:
            view_complex_as_real(g_params, g_grads, g_sqs, g_accs)

        increment_steps(g_steps)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)
        if weight_decay != 0:
            if maximize:
                # g_grads is already our own copy: update it in place
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        torch._foreach_mul_(g_sqs, rho)
        torch._foreach_addcmul_(g_sqs, g_grads, g_grads, value=1 - rho)

        denoms = torch._foreach_add(g_sqs, eps)
        torch._foreach_sqrt_(denoms)

        updates = torch._foreach_add(g_accs, eps)
        torch._foreach_sqrt_(updates)
        torch._foreach_div_(updates, denoms)
        torch._foreach_mul_(updates, g_grads)

        torch._foreach_mul_(g_accs, rho)
        torch._foreach_addcmul_(g_accs, updates, updates, value=1 - rho)

        if capturable and isinstance(lr, Tensor):
            # no .item() on a tensor lr while capturing
            torch._foreach_mul_(updates, -lr)
            torch._foreach_add_(g_params, updates)
        else:
            torch._foreach_add_(g_params, updates, alpha=-lr)


def adadelta(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    acc_deltas: list[Tensor],
    state_steps: list[Tensor],
    capturable: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    lr,
    rho: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Functional Adadelta step over lists of params, grads and state (see optparity.optim.Adadelta)."""
    impl = pick_kernel(
        _single_tensor_adadelta, _multi_tensor_adadelta, params, state_steps, foreach, differentiable
    )
    impl(
        params,
        grads,
        square_avgs,
        acc_deltas,
        state_steps,
        lr=lr,
        rho=rho,
        eps=eps,
        weight_decay=weight_decay,
        maximize=maximize,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
