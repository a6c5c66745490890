"""Adam (Kingma & Ba, 2014) and its decoupled-weight-decay variant (AdamW).

Every path here performs the same floating-point operations, in the same order and with
the same argument kinds (Python float vs 0-dim tensor, scalar vs scalar list), as
torch.optim.adam, because bit identity with torch depends on it. Examples: the first
moment is updated with `lerp_`, the second with `mul_` then `addcmul_`; the for-loop path
reads `step` with `.item()` and builds Python-float bias corrections, while the
capturable/differentiable path keeps them as tensors and folds the step size into the
denominator."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    PerDevice,
    PerDeviceLr,
    check_capturable,
    check_state_steps,
    choose_paths,
    group_by_device_and_dtype,
    increment_steps,
    refuse_amp_scaling,
    refuse_scripting,
    to_scalar,
    view_complex_as_real,
)

__all__ = ["adam"]


def _single_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1,
    beta2,
    lr,
    weight_decay,
    eps: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    refuse_amp_scaling(grad_scale, found_inf)

    lr = to_scalar(lr)
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)

    # A tensor beta1 is cast once per (device, dtype) of the (real-viewed) params it meets.
    beta1_cache: dict | None = (
        {(beta1.device, beta1.dtype): beta1} if isinstance(beta1, Tensor) else None
    )
    beta2_tracks_grad = (
        differentiable and isinstance(beta2, Tensor) and beta2.requires_grad
    )

    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        m = exp_avgs[i]
        v = exp_avg_sqs[i]
        step_t = state_steps[i]

        if capturable:
            check_capturable([param], [step_t], supports_xla=True)

        step_t += 1

        if weight_decay != 0:
            if decoupled_weight_decay:
                # AdamW: shrink the parameter itself, the moments never see the decay.
                param.mul_(1 - lr * weight_decay)
            elif (
                differentiable
                and isinstance(weight_decay, Tensor)
                and weight_decay.requires_grad
            ):
                # addcmul_ (in place on grad) keeps weight_decay in the graph.
                grad = grad.addcmul_(param.clone(), weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            m = torch.view_as_real(m)
            v = torch.view_as_real(v)
            if amsgrad:
                max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
            param = torch.view_as_real(param)

        if beta1_cache is not None:
            key = (param.device, param.dtype)
            if key not in beta1_cache:
                beta1_cache[key] = beta1.to(
                    device=param.device, dtype=param.dtype, non_blocking=True
                )
            b1 = beta1_cache[key]
        else:
            b1 = beta1

        m.lerp_(grad, 1 - b1)
        if beta2_tracks_grad:
            # addcmul_ cannot take a tensor value; lerp towards grad^2 is the same EMA.
            v.lerp_(torch.square(grad), weight=1 - beta2)
        else:
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        if capturable or differentiable:
            # Tensor bias corrections; a grad-tracking beta must not see step's later in-place bump.
            exponent1 = (
                step_t.clone()
                if differentiable and isinstance(beta1, Tensor) and beta1.requires_grad
                else step_t
            )
            exponent2 = step_t.clone() if beta2_tracks_grad else step_t
            bc1 = 1 - beta1**exponent1
            bc2 = 1 - beta2**exponent2

            neg_step_size = (lr / bc1).neg()
            bc2_sqrt = bc2.sqrt()

            if amsgrad:
                running_max = max_exp_avg_sqs[i].clone() if differentiable else max_exp_avg_sqs[i]
                max_exp_avg_sqs[i].copy_(torch.maximum(running_max, v))
                second = max_exp_avg_sqs[i]
            else:
                second = v
            # The step size lives in denom because addcdiv_'s value must be a number.
            denom = (second.sqrt() / (bc2_sqrt * neg_step_size)).add_(eps / neg_step_size)

            param.addcdiv_(m.clone() if differentiable else m, denom)
        else:
            t = state_steps[i].item()
            bc1 = 1 - beta1**t
            bc2 = 1 - beta2**t
            step_size = lr / bc1
            bc2_sqrt = bc2**0.5

            if amsgrad:
                torch.maximum(max_exp_avg_sqs[i], v, out=max_exp_avg_sqs[i])
                denom = (max_exp_avg_sqs[i].sqrt() / bc2_sqrt).add_(eps)
            else:
                denom = (v.sqrt() / bc2_sqrt).add_(eps)

            param.addcdiv_(m, denom, value=-step_size)

        # Hand the caller's list its complex view back.
        if amsgrad and torch.is_complex(params[i]):
            max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])


def _multi_tensor_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1,
    beta2,
    lr,
    weight_decay: float,
    eps: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    if len(params) == 0:
        return

    # Tensor hyperparameters only work on the capturable foreach path.
    if isinstance(lr, Tensor):
        if not capturable:
            raise RuntimeError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(beta, Tensor):
            if not capturable:
                raise ValueError(
                    f"{name} as a Tensor is not supported for capturable=False and foreach=True"
                )
            if beta.numel() != 1:
                raise ValueError(f"Tensor {name} must be 1-element")

    if capturable:
        check_capturable(params, state_steps, supports_xla=False)

    refuse_amp_scaling(grad_scale, found_inf)
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")

    lr = to_scalar(lr)
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)

    groups = group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    )

    # Only a non-CPU tensor beta1 gets copied per device; on CPU it is used as is.
    beta1_per_device: dict | None = (
        {beta1.device: beta1}
        if isinstance(beta1, Tensor) and str(beta1.device) != "cpu"
        else None
    )

    for (g_params, g_grads, g_m, g_v, g_vmax, g_steps), _ in groups.values():
        device = g_params[0].device
        if beta1_per_device is not None and device not in beta1_per_device:
            beta1_per_device[device] = beta1.to(device=device, non_blocking=True)
        b1 = beta1_per_device[device] if beta1_per_device else beta1

        if has_complex:
            if amsgrad:
                view_complex_as_real(g_params, g_grads, g_m, g_v, g_vmax)
            else:
                view_complex_as_real(g_params, g_grads, g_m, g_v)

        if maximize:
            g_grads = torch._foreach_neg(g_grads)

        increment_steps(g_steps)

        if weight_decay != 0:
            if decoupled_weight_decay:
                torch._foreach_mul_(g_params, 1 - lr * weight_decay)
            elif maximize:
                # g_grads is already our own copy (the negation): update it in place.
                torch._foreach_add_(g_grads, g_params, alpha=weight_decay)
            else:
                g_grads = torch._foreach_add(g_grads, g_params, alpha=weight_decay)

        torch._foreach_lerp_(g_m, g_grads, 1 - b1)
        torch._foreach_mul_(g_v, beta2)
        # _foreach_addcmul_ takes only a Python number as value, so a tensor beta2
        # is applied to the grads beforehand.
        if isinstance(beta2, Tensor):
            scaled = torch._foreach_mul(g_grads, 1 - beta2)
            value = 1.0
        else:
            scaled = g_grads
            value = 1 - beta2
        torch._foreach_addcmul_(g_v, scaled, g_grads, value)
        del g_grads, scaled

        if capturable:
            # Everything stays on device: step_size = -lr / (1 - beta1^t) is kept as its
            # reciprocal's negation and folded into the denominator.
            bc1 = torch._foreach_pow(beta1, g_steps)
            bc2 = torch._foreach_pow(beta2, g_steps)
            torch._foreach_sub_(bc1, 1)
            torch._foreach_sub_(bc2, 1)
            torch._foreach_neg_(bc2)
            torch._foreach_div_(bc1, lr)
            torch._foreach_reciprocal_(bc1)
            torch._foreach_sqrt_(bc2)

            if amsgrad:
                torch._foreach_maximum_(g_vmax, g_v)
                denom = torch._foreach_sqrt(g_vmax)
            else:
                denom = torch._foreach_sqrt(g_v)
            torch._foreach_div_(denom, bc2)
            torch._foreach_add_(denom, eps)
            torch._foreach_div_(denom, bc1)
            torch._foreach_addcdiv_(g_params, g_m, denom)
        else:
            bc1_list = [1 - beta1 ** s.item() for s in g_steps]
            bc2_list = [1 - beta2 ** s.item() for s in g_steps]
            neg_step_sizes = [(lr / bc) * -1 for bc in bc1_list]
            bc2_sqrt_list = [bc**0.5 for bc in bc2_list]

            if amsgrad:
                torch._foreach_maximum_(g_vmax, g_v)
                denom = torch._foreach_sqrt(g_vmax)
            else:
                denom = torch._foreach_sqrt(g_v)
            torch._foreach_div_(denom, bc2_sqrt_list)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(g_params, g_m, denom, neg_step_sizes)


def _fused_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    *,
    amsgrad: bool,
    has_complex: bool,
    beta1,
    beta2,
    lr,
    weight_decay: float,
    eps: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    decoupled_weight_decay: bool,
) -> None:
    if not params:
        return
    if differentiable:
        raise RuntimeError("Adam with fused=True does not support differentiable=True")

    # lr deliberately stays as given (the kernel has a tensor-lr overload).
    beta1 = to_scalar(beta1)
    beta2 = to_scalar(beta2)

    scale_on = PerDevice(grad_scale, non_blocking=True)
    inf_on = PerDevice(found_inf, non_blocking=True)
    lr_on = PerDeviceLr(lr)

    kernel = torch._fused_adamw_ if decoupled_weight_decay else torch._fused_adam_
    groups = group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    )
    for (device, _), ((g_params, g_grads, g_m, g_v, g_vmax, g_steps), _) in groups.items():
        g_scale = scale_on.on(device)
        g_inf = inf_on.on(device)
        lr = lr_on.on(device)

        torch._foreach_add_(g_steps, 1)
        kernel(
            g_params,
            g_grads,
            g_m,
            g_v,
            g_vmax,
            g_steps,
            amsgrad=amsgrad,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            maximize=maximize,
            grad_scale=g_scale,
            found_inf=g_inf,
        )
        if g_inf is not None:
            # A skipped (inf/nan) step must not count.
            torch._foreach_sub_(g_steps, [g_inf] * len(g_steps))


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    decoupled_weight_decay: bool = False,
    *,
    amsgrad: bool,
    beta1,
    beta2,
    lr,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Functional Adam: update `params` and the state lists in place (see optparity.optim.Adam)."""
    # Fused is never picked automatically; foreach follows torch's device rule, except
    # that a tensor lr without capturable keeps us on the for-loop.
    foreach, fused = choose_paths(
        params,
        differentiable,
        foreach,
        fused,
        foreach_allowed=not (isinstance(lr, Tensor) and not capturable),
    )
    check_state_steps(state_steps)
    refuse_scripting(foreach, fused)

    if fused:
        impl = _fused_adam
    elif foreach:
        impl = _multi_tensor_adam
    else:
        impl = _single_tensor_adam

    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        amsgrad=amsgrad,
        has_complex=has_complex,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        capturable=capturable,
        differentiable=differentiable,
        grad_scale=grad_scale,
        found_inf=found_inf,
        decoupled_weight_decay=decoupled_weight_decay,
    )
