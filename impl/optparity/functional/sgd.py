"""SGD math (plain, momentum, Nesterov), mirroring torch.optim.sgd op for op.

Three paths: a per-tensor loop, a foreach path (batched by device/dtype) and the fused
kernel `torch._fused_sgd_`. The momentum buffer list is filled in place: an entry that is
None means "no buffer yet" and becomes a detached copy of the (decayed) gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    PerDevice,
    default_foreach,
    group_by_device_and_dtype,
    refuse_amp_scaling,
    refuse_scripting,
    to_scalar,
)

__all__ = ["sgd"]


def sgd(
    params: list[Tensor],
    d_p_list: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """Functional SGD; same signature and path choice as torch.optim.sgd.sgd."""
    # Only pick a default when the caller left both switches unset. SGD never defaults
    # to fused, and the choice ignores differentiability here (torch passes False).
    if foreach is None and fused is None:
        if torch.jit.is_scripting():
            foreach, fused = False, False
        else:
            foreach, fused = default_foreach(params, False), False
    foreach = bool(foreach) if foreach is not None else False
    fused = bool(fused) if fused is not None else False

    refuse_scripting(foreach, fused)

    # For SGD the foreach flag wins over fused when both are set.
    if foreach:
        impl = _multi_tensor_sgd
    elif fused:
        impl = _fused_sgd
    else:
        impl = _single_tensor_sgd

    impl(
        params,
        d_p_list,
        momentum_buffer_list,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        has_sparse_grad=has_sparse_grad,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _single_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    refuse_amp_scaling(grad_scale, found_inf)
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)
    lr_in_graph = isinstance(lr, Tensor) and lr.requires_grad
    wd_in_graph = isinstance(weight_decay, Tensor) and weight_decay.requires_grad

    for idx, p in enumerate(params):
        d_p = -grads[idx] if maximize else grads[idx]

        if weight_decay != 0:
            if wd_in_graph:
                # Autograd-tracked decay: in place on the (possibly shared) grad, with a
                # clone of the param so the graph does not see the later in-place update.
                d_p = d_p.addcmul_(p.clone(), weight_decay)
            else:
                d_p = d_p.add(p, alpha=weight_decay)

        if momentum != 0:
            buf = momentum_buffer_list[idx]
            if buf is not None:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            else:
                # First use: the buffer starts as the gradient itself (no dampening).
                buf = d_p.detach().clone()
                momentum_buffer_list[idx] = buf
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf

        if lr_in_graph:
            p.addcmul_(d_p, lr, value=-1)
        else:
            p.add_(d_p, alpha=-lr)


def _multi_tensor_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    refuse_amp_scaling(grad_scale, found_inf)
    if not params:
        return
    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, momentum_buffer_list])
    for (g_params, g_grads, g_bufs), where in groups.values():
        sparse_here = has_sparse_grad and any(g.is_sparse for g in g_grads)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)
        if weight_decay != 0:
            if maximize:
                # the negated grads are already our own copies: decay them in place
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        if momentum != 0:
            if all(b is not None for b in g_bufs):
                bufs = list(g_bufs)
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, g_grads, alpha=1 - dampening)
            else:
                # Some buffers are missing: fall back to one tensor at a time and write
                # the new buffers back into the caller's list.
                bufs = []
                for j, b in enumerate(g_bufs):
                    if b is None:
                        b = g_grads[j].detach().clone()
                        g_bufs[j] = b
                        momentum_buffer_list[where[j]] = b
                    else:
                        b.mul_(momentum).add_(g_grads[j], alpha=1 - dampening)
                    bufs.append(b)

            if nesterov:
                torch._foreach_add_(g_grads, bufs, alpha=momentum)
            else:
                g_grads = bufs

        if sparse_here:
            # foreach kernels reject sparse tensors
            for p, d_p in zip(g_params, g_grads):
                p.add_(d_p, alpha=-lr)
        elif isinstance(lr, Tensor) and torch.compiler.is_compiling():
            torch._foreach_add_(g_params, torch._foreach_mul(g_grads, -lr))
        else:
            torch._foreach_add_(g_params, g_grads, alpha=-lr)


def _fused_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    has_sparse_grad: bool,
) -> None:
    if not params:
        return
    if has_sparse_grad:
        raise RuntimeError("`_fused_sgd` does not support sparse gradients")

    scale_on = PerDevice(grad_scale, non_blocking=False)
    inf_on = PerDevice(found_inf, non_blocking=False)

    uses_buffers = momentum != 0
    # The kernel initialises buffers itself on the first step, given uninitialised storage.
    first_step = uses_buffers and all(b is None for b in momentum_buffer_list)
    if first_step:
        for j, g in enumerate(grads):
            momentum_buffer_list[j] = torch.empty_like(g)

    groups = group_by_device_and_dtype([params, grads, momentum_buffer_list])
    for (device, _dtype), ((g_params, g_grads, g_bufs), _) in groups.items():
        dev_scale = scale_on.on(device)
        dev_inf = inf_on.on(device)
        torch._fused_sgd_(
            g_params,
            g_grads,
            g_bufs if uses_buffers else [],
            weight_decay=weight_decay,
            momentum=momentum,
            lr=lr,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            is_first_step=first_step,
            grad_scale=dev_scale,
            found_inf=dev_inf,
        )
