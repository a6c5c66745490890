"""NAdam (Dozat, 2016): Adam with Nesterov momentum, the momentum coefficient warmed up by
`momentum_decay` and the product of all past coefficients kept per parameter (`mu_product`).

Bit parity with torch.optim.nadam needs its operation order, and its two paths differ:
the for-loop path divides the second moment by the bias correction *before* the square root
and applies the two addcdiv_ terms with Python-float step sizes (reading `mu_product` after
it was updated); the foreach path takes the square root first and divides by the square root
of the bias correction. Capturable/differentiable for-loop steps keep every factor a tensor."""
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

__all__ = ["nadam"]


def _single_tensor_nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    momentum_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if not torch.jit.is_scripting():
        lr = to_scalar(lr)

    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        m = exp_avgs[i]
        v = exp_avg_sqs[i]
        mu_product = mu_products[i]
        step_t = state_steps[i]

        # Unlike Adam, the real views come first: weight decay acts on them.
        if torch.is_complex(param):
            param = torch.view_as_real(param)
            grad = torch.view_as_real(grad)
            m = torch.view_as_real(m)
            v = torch.view_as_real(v)

        if capturable:
            check_capturable([param], [step_t], companions=([mu_product],),
                             names="params, mu_products and state_steps")

        step_t += 1
        step = step_t if capturable else as_python_number(step_t)

        bias_correction2 = 1 - beta2**step

        if weight_decay != 0:
            if decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        # momentum coefficients of this step and the next
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
        mu_product *= mu

        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = v.div(bias_correction2).sqrt()

        if differentiable or capturable:
            # Scale the tensors themselves (addcdiv_'s value must be a number) so autograd
            # sees every factor.
            denom = denom.add(eps)
            mu_product_next = mu_product * mu_next
            grad = grad * (-lr * (1.0 - mu) / (1.0 - mu_product))
            m = m * (-lr * mu_next / (1.0 - mu_product_next))
            param.addcdiv_(grad, denom)
            param.addcdiv_(m, denom)
        else:
            mu_product_value = as_python_number(mu_product)
            mu_product_next = mu_product_value * mu_next
            denom.add_(eps)
            param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product_value)))
            param.addcdiv_(m, denom, value=(-lr * mu_next) / (1.0 - mu_product_next))


def _multi_tensor_nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    momentum_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if len(params) == 0:
        return

    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")

    if capturable:
        check_capturable(params, state_steps, supports_xla=False, companions=(mu_products,),
                         names="params, mu_products, and state_steps")

    lr = to_scalar(lr)

    groups = group_by_device_and_dtype(
        [params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps], with_indices=False
    )
    for (g_params, g_grads, g_m, g_v, g_mu_products, g_steps), _ in groups.values():
        if has_complex:
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

        torch._foreach_lerp_(g_m, g_grads, 1 - beta1)
        torch._foreach_mul_(g_v, beta2)
        torch._foreach_addcmul_(g_v, g_grads, g_grads, 1 - beta2)

        denom = torch._foreach_sqrt(g_v)

        if capturable:
            # mu = beta1 * (1 - 0.5 * 0.96^(t * psi)), mu_next the same at t + 1, on device
            exponent = torch._foreach_mul(g_steps, momentum_decay)
            mus = torch._foreach_pow(0.96, exponent)
            torch._foreach_mul_(mus, -0.5)
            torch._foreach_add_(mus, 1.0)
            torch._foreach_mul_(mus, beta1)
            torch._foreach_add_(exponent, momentum_decay)
            mu_nexts = torch._foreach_pow(0.96, exponent)
            torch._foreach_mul_(mu_nexts, -0.5)
            torch._foreach_add_(mu_nexts, 1.0)
            torch._foreach_mul_(mu_nexts, beta1)
            del exponent

            # sqrt(1 - beta2^t), computed as sqrt(-(beta2^t - 1))
            bc2_sqrt = torch._foreach_pow(beta2, g_steps)
            torch._foreach_sub_(bc2_sqrt, 1.0)
            torch._foreach_neg_(bc2_sqrt)
            torch._foreach_sqrt_(bc2_sqrt)
        else:
            bc2_sqrt = [(1 - beta2 ** as_python_number(s)) ** 0.5 for s in g_steps]
            mus = [
                beta1 * (1.0 - 0.5 * (0.96 ** (as_python_number(s) * momentum_decay)))
                for s in g_steps
            ]
            mu_nexts = [
                beta1 * (1.0 - 0.5 * (0.96 ** ((as_python_number(s) + 1) * momentum_decay)))
                for s in g_steps
            ]

        torch._foreach_mul_(g_mu_products, mus)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        del bc2_sqrt

        if capturable:
            # grad factor -lr * (1 - mu) / (1 - mu_product), built in mus' buffers
            torch._foreach_sub_(mus, 1.0)
            torch._foreach_mul_(mus, lr)
            one_minus_prod = torch._foreach_sub(g_mu_products, 1.0)
            torch._foreach_neg_(one_minus_prod)
            torch._foreach_div_(mus, one_minus_prod)
            grad_factors = mus
            del one_minus_prod

            # exp_avg factor -lr * mu_next / (1 - mu_product * mu_next), in mu_nexts' buffers
            prod_minus_one = torch._foreach_mul(g_mu_products, mu_nexts)
            torch._foreach_mul_(mu_nexts, lr)
            torch._foreach_sub_(prod_minus_one, 1.0)
            torch._foreach_div_(mu_nexts, prod_minus_one)
            avg_factors = mu_nexts
            del prod_minus_one

            # The factors are 0-dim: multiplying into them would not broadcast, so a new list.
            numerator = torch._foreach_mul(grad_factors, g_grads)
            torch._foreach_addcmul_(numerator, avg_factors, g_m)
            torch._foreach_addcdiv_(g_params, numerator, denom)
        else:
            lr_value = as_python_number(lr)
            grad_factors = [
                (lr_value * (1.0 - mu) / (1.0 - as_python_number(prod))) * -1
                for prod, mu in zip(g_mu_products, mus, strict=True)
            ]
            avg_factors = [
                (lr_value * mu_next / (1.0 - as_python_number(prod) * mu_next)) * -1
                for prod, mu_next in zip(g_mu_products, mu_nexts, strict=True)
            ]
            torch._foreach_addcdiv_(g_params, g_grads, denom, grad_factors)
            torch._foreach_addcdiv_(g_params, g_m, denom, avg_factors)


def nadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    mu_products: list[Tensor],
    state_steps: list[Tensor],
    # Positional-with-default flags kept in torch's order for API compatibility.
    decoupled_weight_decay: bool = False,
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    maximize: bool = False,
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    momentum_decay: float,
    eps: float,
) -> None:
    """Functional NAdam step over lists of tensors (see optparity.optim.NAdam)."""
    # torch checks both lists even while compiling
    check_state_steps(state_steps, skip_when_compiling=False)
    check_state_steps(mu_products, skip_when_compiling=False, what="mu_products")
    impl = pick_kernel(_single_tensor_nadam, _multi_tensor_nadam, params, state_steps, foreach,
                       differentiable, check_steps=False)
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        mu_products,
        state_steps,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        momentum_decay=momentum_decay,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        eps=eps,
        capturable=capturable,
        differentiable=differentiable,
        has_complex=has_complex,
    )
