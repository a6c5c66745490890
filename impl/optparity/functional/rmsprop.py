"""RMSprop (Hinton's lecture notes; centered variant from Graves, 2013).

The step divides the gradient by sqrt(running mean of grad^2) + eps (sqrt first, then
eps). The kinds and order of operations copy torch.optim.rmsprop exactly: lerp_ for the
centered mean, addcmul with value=-1 for the variance, addcdiv_ for the update."""
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

__all__ = ["rmsprop"]


def _single_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for i, p in enumerate(params):
        step = state_steps[i]
        # checked per parameter, inside the loop (earlier params are already updated)
        if capturable:
            check_capturable([p], [step], supports_xla=True)

        g = grads[i]
        if maximize:
            g = -g
        sq = square_avgs[i]

        step += 1

        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)

        complex_param = torch.is_complex(p)
        if complex_param:
            p = torch.view_as_real(p)
            g = torch.view_as_real(g)
            sq = torch.view_as_real(sq)

        sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)

        if centered:
            mean_g = grad_avgs[i]
            if complex_param:
                mean_g = torch.view_as_real(mean_g)
            mean_g.lerp_(g, 1 - alpha)
            # variance estimate E[g^2] - E[g]^2, then its root
            denom = sq.addcmul(mean_g, mean_g, value=-1).sqrt_()
        else:
            denom = sq.sqrt()

        # differentiable keeps the sqrt result intact in the graph
        denom = denom.add(eps) if differentiable else denom.add_(eps)

        if momentum > 0:
            buf = momentum_buffer_list[i]
            if complex_param:
                buf = torch.view_as_real(buf)
            buf.mul_(momentum).addcdiv_(g, denom)
            p.add_(buf, alpha=-lr)
        else:
            p.addcdiv_(g, denom, value=-lr)


def _multi_tensor_rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
    maximize: bool,
    differentiable: bool,
    capturable: bool,
    has_complex: bool,
) -> None:
    # torch returns on an empty list before the differentiable check
    if not params:
        return
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if capturable:
        check_capturable(params, state_steps, supports_xla=True)

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype(
        [params, grads, square_avgs, grad_avgs, momentum_buffer_list, state_steps]
    )
    for (g_params, g_grads, g_sqs, g_means, g_bufs, g_steps), _ in groups.values():
        if has_complex:
            companions = [g_grads, g_sqs]
            if momentum > 0:
                companions.append(g_bufs)
            if centered:
                companions.append(g_means)
            view_complex_as_real(g_params, *companions)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        increment_steps(g_steps)

        if weight_decay != 0:
            if maximize:
                # the negated grads are our own copy already
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        torch._foreach_mul_(g_sqs, alpha)
        torch._foreach_addcmul_(g_sqs, g_grads, g_grads, value=1 - alpha)

        if centered:
            torch._foreach_lerp_(g_means, g_grads, 1 - alpha)
            denoms = torch._foreach_addcmul(g_sqs, g_means, g_means, value=-1)
            torch._foreach_sqrt_(denoms)
        else:
            denoms = torch._foreach_sqrt(g_sqs)
        torch._foreach_add_(denoms, eps)

        tensor_lr_capture = capturable and isinstance(lr, Tensor)
        if momentum > 0:
            torch._foreach_mul_(g_bufs, momentum)
            torch._foreach_addcdiv_(g_bufs, g_grads, denoms)
            if tensor_lr_capture:
                scaled = torch._foreach_mul(g_bufs, -lr)
                torch._foreach_add_(g_params, scaled)
            else:
                torch._foreach_add_(g_params, g_bufs, alpha=-lr)
        elif tensor_lr_capture:
            torch._foreach_div_(denoms, -lr)
            torch._foreach_addcdiv_(g_params, g_grads, denoms)
        else:
            torch._foreach_addcdiv_(g_params, g_grads, denoms, value=-lr)


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffer_list: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    maximize: bool = False,
    differentiable: bool = False,
    capturable: bool = False,
    has_complex: bool = False,
    *,
    lr,
    alpha: float,
    eps: float,
    weight_decay: float,
    momentum: float,
    centered: bool,
) -> None:
    """Functional RMSprop step over lists of params, grads and state (see optparity.optim.RMSprop)."""
    impl = pick_kernel(
        _single_tensor_rmsprop, _multi_tensor_rmsprop, params, state_steps, foreach, differentiable
    )
    impl(
        params,
        grads,
        square_avgs,
        grad_avgs,
        momentum_buffer_list,
        state_steps,
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        maximize=maximize,
        differentiable=differentiable,
        capturable=capturable,
        has_complex=has_complex,
    )
