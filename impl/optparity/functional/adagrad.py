"""Adagrad math, mirroring torch.optim.adagrad op for op.

Paths: per-tensor loop (also the only one handling sparse grads), foreach (batched by
device/dtype; groups holding a sparse grad drop back to the loop) and the fused kernel
`torch._fused_adagrad_`. Steps are incremented in place in `state_steps`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    PerDevice,
    PerDeviceLr,
    check_state_steps,
    choose_paths,
    group_by_device_and_dtype,
    increment_steps,
    refuse_amp_scaling,
    refuse_scripting,
    to_scalar,
    view_complex_as_real,
)

__all__ = ["adagrad"]


def _step_value(step: Tensor):
    # A Python number in eager (cheaper than CPU tensor math); the tensor when tracing.
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        return step
    return step.item() if isinstance(step, Tensor) else step


def adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    lr: float,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Functional Adagrad; same signature and path choice as torch.optim.adagrad.adagrad."""
    # Unlike most algorithms, torch checks this even while compiling.
    check_state_steps(state_steps, skip_when_compiling=False)
    # Default only when neither switch was given; Adagrad never defaults to fused.
    foreach, fused = choose_paths(params, differentiable, foreach, fused)
    refuse_scripting(foreach, fused)

    # For Adagrad fused wins over foreach when both are set.
    if fused:
        impl = _fused_adagrad
    elif foreach:
        impl = _multi_tensor_adagrad
    else:
        impl = _single_tensor_adagrad

    impl(
        params,
        grads,
        state_sums,
        state_steps,
        lr=lr,
        weight_decay=weight_decay,
        lr_decay=lr_decay,
        eps=eps,
        has_sparse_grad=has_sparse_grad,
        maximize=maximize,
        differentiable=differentiable,
        has_complex=has_complex,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _sparse_like(template: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """COO tensor shaped like `template` with the given indices/values."""
    return torch.sparse_coo_tensor(indices, values, template.size())


def _single_tensor_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    refuse_amp_scaling(grad_scale, found_inf)
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for p, g, acc, step_t in zip(params, grads, state_sums, state_steps, strict=True):
        step_t += 1
        t = _step_value(step_t)
        if maximize:
            g = -g

        if weight_decay != 0:
            if g.is_sparse:
                raise RuntimeError("weight_decay option is not compatible with sparse gradients")
            g = g.add(p, alpha=weight_decay)

        # decayed learning rate; Python float math unless lr is a tensor
        clr = lr / (1 + (t - 1) * lr_decay)

        if g.is_sparse:
            # the update is non-linear in g, so duplicate indices must be summed first
            g = g.coalesce()
            idx = g._indices()
            vals = g._values()
            acc.add_(_sparse_like(g, idx, vals.pow(2)))
            denom_vals = acc.sparse_mask(g)._values().sqrt_().add_(eps)
            p.add_(_sparse_like(g, idx, vals / denom_vals), alpha=-clr)
            continue

        if torch.is_complex(p):
            # treat real and imaginary parts as independent coordinates
            g = torch.view_as_real(g)
            acc = torch.view_as_real(acc)
            p = torch.view_as_real(p)
        acc.addcmul_(g, g, value=1)
        # out-of-place add keeps autograd happy when differentiable
        denom = acc.sqrt() + eps if differentiable else acc.sqrt().add_(eps)
        p.addcdiv_(g, denom, value=-clr)


def _multi_tensor_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: float,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    refuse_amp_scaling(grad_scale, found_inf)
    if not params:
        return

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype([params, grads, state_sums, state_steps])
    for (g_params, g_grads, g_sums, g_steps), _ in groups.values():
        if has_sparse_grad and any(x.is_sparse for x in g_grads):
            _single_tensor_adagrad(
                g_params,
                g_grads,
                g_sums,
                g_steps,
                lr=lr,
                weight_decay=weight_decay,
                lr_decay=lr_decay,
                eps=eps,
                has_sparse_grad=True,
                maximize=maximize,
                differentiable=differentiable,
                has_complex=has_complex,
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            continue

        if has_complex:
            view_complex_as_real(g_params, g_grads, g_sums)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        increment_steps(g_steps)

        if weight_decay != 0:
            if maximize:
                # g_grads are already fresh copies from the negation
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        neg_clr = [-lr / (1 + (_step_value(s) - 1) * lr_decay) for s in g_steps]

        torch._foreach_addcmul_(g_sums, g_grads, g_grads, value=1)
        denom = torch._foreach_sqrt(g_sums)
        torch._foreach_add_(denom, eps)

        if weight_decay != 0 or maximize:
            # scale our own intermediate in place
            torch._foreach_mul_(g_grads, neg_clr)
            scaled = g_grads
        else:
            scaled = torch._foreach_mul(g_grads, neg_clr)
        torch._foreach_addcdiv_(g_params, scaled, denom)


def _fused_adagrad(
    params: list[Tensor],
    grads: list[Tensor],
    state_sums: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    lr: float | Tensor,
    weight_decay: float,
    lr_decay: float,
    eps: float,
    has_sparse_grad: bool,
    maximize: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if not params:
        return
    if has_sparse_grad or has_complex:
        raise RuntimeError("`fused` does not support sparse grad or complex param")
    if differentiable:
        raise RuntimeError("adagrad with fused=True does not support differentiable=True")

    scale_on = PerDevice(grad_scale, non_blocking=True)
    inf_on = PerDevice(found_inf, non_blocking=True)
    lr_on = PerDeviceLr(lr)

    groups = group_by_device_and_dtype([params, grads, state_sums, state_steps])
    for (device, _dtype), ((g_params, g_grads, g_sums, g_steps), _) in groups.items():
        dev_scale = scale_on.on(device)
        dev_inf = inf_on.on(device)
        lr = lr_on.on(device)

        torch._foreach_add_(g_steps, 1)
        torch._fused_adagrad_(
            g_params,
            g_grads,
            g_sums,
            g_steps,
            lr=lr,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            grad_scale=dev_scale,
            found_inf=dev_inf,
        )
        if dev_inf is not None:
            # skipped steps do not count
            torch._foreach_sub_(g_steps, [dev_inf] * len(g_steps))
