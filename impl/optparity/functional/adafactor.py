"""Adafactor (Shazeer & Stern, 2018) as torch.optim.adafactor computes it, op for op.

A parameter with more than one dimension keeps factored second moments (a row and a column
mean of grad^2 over its last two dimensions, both updated with `lerp_`); a vector or scalar
keeps a full `variance`. Quirks kept because the bits depend on them: `eps1=None` is resolved
to the machine epsilon of the *first* param (or dtype group) met and then reused for all the
others; the row/column means come from `norm(...).square_()` / `_foreach_mul_(x, x)`, not from
`(g * g).mean()`; the step size reads the param's RMS before the weight decay shrinks it."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    group_by_device_and_dtype,
    increment_steps,
    to_scalar,
)

__all__ = ["adafactor"]


def _refuse_grad_scaling(grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Grad scaling should occur outside of optimizer.step()")


def _rms_scale(param: Tensor, eps2: float) -> float:
    # max(eps2, RMS(param)), read as Python floats like torch
    return max(eps2, param.norm(2).item() / (param.numel() ** 0.5))


def _clip_denominator(update: Tensor, d: float) -> float:
    return max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * d))


def _single_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    d: float,
    lr,
    beta2_decay: float,
    weight_decay: float,
    eps1: float | None,
    eps2: float,
    maximize: bool,
    has_complex: bool,
) -> None:
    _refuse_grad_scaling(grad_scale, found_inf)
    if torch.jit.is_scripting():
        if not isinstance(lr, float):
            raise AssertionError(f"Expected lr to be a float, but got {type(lr)}")
    else:
        lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        step_t = state_steps[i]
        if eps1 is None:
            eps1 = torch.finfo(param.dtype).eps  # then kept for the params that follow

        step_t += 1
        t = step_t.item()
        one_minus_beta2 = t**beta2_decay
        rho = min(lr, 1 / (t**0.5))
        alpha = _rms_scale(param, eps2) * rho

        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)

        if grad.dim() > 1:
            row_var, col_var = row_vars[i], col_vars[i]
            if row_var is None or col_var is None:
                raise AssertionError(
                    "row_var and col_var should be defined when grad is multidimensional"
                )
            row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
            row_var.lerp_(row_mean, one_minus_beta2)
            col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
            col_var.lerp_(col_mean, one_minus_beta2)
            var_estimate = row_var @ col_var
            var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            variance = variances[i]
            if variance is None:
                raise AssertionError("variance should be defined when grad is a vector")
            variance.lerp_(grad * grad, one_minus_beta2)
            var_estimate = variance.clone()  # the update below works in place

        # eps1 squared: the rsqrt brings it back to eps1's magnitude
        update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
        update.mul_(grad)
        param.add_(update, alpha=-alpha / _clip_denominator(update, d))


def _group_by_device_dtype_and_factoring(tensorlists: list[list]) -> dict:
    """torch's device/dtype groups, each split into factored (grad.dim() > 1) and unfactored
    members, keyed (device, dtype, factored) in the order torch meets them."""
    out: dict = {}
    for (device, dtype), (lists, _) in group_by_device_and_dtype(tensorlists).items():
        for j, grad in enumerate(lists[1]):
            if grad is None:
                raise AssertionError("grad should not be None")
            key = (device, dtype, grad.dim() > 1)
            members = out.setdefault(key, [[] for _ in lists])
            for dst, src in zip(members, lists):
                dst.append(src[j])
    return out


def _multi_tensor_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    d: float,
    lr,
    beta2_decay: float,
    weight_decay: float,
    eps1: float | None,
    eps2: float,
    maximize: bool,
    has_complex: bool,
) -> None:
    if not params:
        return
    _refuse_grad_scaling(grad_scale, found_inf)
    lr = to_scalar(lr)

    groups = _group_by_device_dtype_and_factoring(
        [params, grads, row_vars, col_vars, variances, state_steps]
    )
    for (_, dtype, factored), (g_params, g_grads, g_rows, g_cols, g_vars, g_steps) in groups.items():
        if eps1 is None:
            eps1 = torch.finfo(dtype if dtype is not None else g_params[0].dtype).eps

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        increment_steps(g_steps)

        one_minus_beta2s = [s.item() ** beta2_decay for s in g_steps]
        alphas = [
            _rms_scale(p, eps2) * min(lr, 1 / (s.item() ** 0.5))
            for p, s in zip(g_params, g_steps, strict=True)
        ]

        if weight_decay != 0:
            torch._foreach_mul_(g_params, 1 - lr * weight_decay)

        if factored:
            if g_rows[0] is None or g_cols[0] is None:
                raise AssertionError(
                    "row_var and col_var should be defined when grad is multidimensional"
                )
            row_means = [torch.norm(g, dim=-1, keepdim=True) for g in g_grads]
            torch._foreach_mul_(row_means, row_means)
            torch._foreach_div_(row_means, [g.size(-1) for g in g_grads])
            torch._foreach_lerp_(g_rows, row_means, one_minus_beta2s)
            del row_means

            col_means = [torch.norm(g, dim=-2, keepdim=True) for g in g_grads]
            torch._foreach_mul_(col_means, col_means)
            torch._foreach_div_(col_means, [g.size(-2) for g in g_grads])
            torch._foreach_lerp_(g_cols, col_means, one_minus_beta2s)
            del col_means

            estimates = [r @ c for r, c in zip(g_rows, g_cols, strict=True)]
            row_var_means = [r.mean(dim=-2, keepdim=True) for r in g_rows]
            torch._foreach_clamp_min_(row_var_means, eps1)
            torch._foreach_div_(estimates, row_var_means)
            del row_var_means
        else:
            if g_vars[0] is None:
                raise AssertionError("variance should be defined when grad is a vector")
            squared = torch._foreach_mul(g_grads, g_grads)
            torch._foreach_lerp_(g_vars, squared, one_minus_beta2s)
            del squared
            estimates = [v.clone() for v in g_vars]

        torch._foreach_clamp_min_(estimates, eps1 * eps1)
        torch._foreach_rsqrt_(estimates)
        torch._foreach_mul_(estimates, g_grads)
        updates = estimates

        scales = [-a / _clip_denominator(u, d) for a, u in zip(alphas, updates, strict=True)]
        torch._foreach_mul_(updates, scales)
        torch._foreach_add_(g_params, updates)


def adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    row_vars: list[Tensor | None],
    col_vars: list[Tensor | None],
    variances: list[Tensor | None],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    d: float,
    lr,
    beta2_decay: float,
    weight_decay: float,
    eps1: float | None,
    eps2: float,
    maximize: bool,
) -> None:
    """Functional Adafactor (see optparity.optim.Adafactor). foreach only when asked for:
    unlike other algorithms torch never defaults to it (its extra memory defeats the point)."""
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` argument must contain a list of singleton tensors")
    impl = _multi_tensor_adafactor if foreach else _single_tensor_adafactor
    impl(
        params,
        grads,
        row_vars,
        col_vars,
        variances,
        state_steps,
        d=d,
        lr=lr,
        beta2_decay=beta2_decay,
        weight_decay=weight_decay,
        eps1=eps1,
        eps2=eps2,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
        has_complex=has_complex,
    )
