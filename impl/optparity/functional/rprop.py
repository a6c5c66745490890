"""Rprop: per-element step sizes grown/shrunk by the sign agreement of successive gradients.

Matches torch.optim.rprop bit for bit. Note the two paths handle `maximize` differently
(for-loop negates the gradient up front; foreach negates the sign product and the stored
gradient), and the foreach path stores the new `prev` by reusing the `prev` buffers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import (
    check_capturable,
    group_by_device_and_dtype,
    increment_steps,
    pick_kernel,
    view_complex_as_real,
)

__all__ = ["rprop"]


def _sign_to_factor_(sign: Tensor, etaminus: float, etaplus: float, capturable: bool) -> None:
    """In place: +1 -> etaplus, -1 -> etaminus, 0 -> 1 (checked in that order)."""
    if capturable:
        # Masked writes would sync with the host; use where() instead.
        sign.copy_(torch.where(sign.gt(0), etaplus, sign))
        sign.copy_(torch.where(sign.lt(0), etaminus, sign))
        sign.copy_(torch.where(sign.eq(0), 1, sign))
    else:
        sign[sign.gt(0)] = etaplus
        sign[sign.lt(0)] = etaminus
        sign[sign.eq(0)] = 1


def _single_tensor_rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_size_min: float,
    step_size_max: float,
    etaminus: float,
    etaplus: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    for idx, param in enumerate(params):
        g = grads[idx]
        if maximize:
            g = -g
        prev = prevs[idx]
        delta = step_sizes[idx]
        step = state_steps[idx]

        if capturable:
            check_capturable([param], [step], supports_xla=True)

        step += 1

        if torch.is_complex(param):
            g = torch.view_as_real(g)
            prev = torch.view_as_real(prev)
            param = torch.view_as_real(param)
            delta = torch.view_as_real(delta)

        # prev is overwritten below, so autograd needs its own copy.
        factor = (g.mul(prev.clone()) if differentiable else g.mul(prev)).sign()
        _sign_to_factor_(factor, etaminus, etaplus, capturable)

        delta.mul_(factor).clamp_(step_size_min, step_size_max)

        # Where the sign flipped, forget this gradient (no move, and prev becomes 0).
        g = g.clone(memory_format=torch.preserve_format)
        if capturable:
            g.copy_(torch.where(factor.eq(etaminus), 0, g))
        else:
            g[factor.eq(etaminus)] = 0

        param.addcmul_(g.sign(), delta, value=-1)
        prev.copy_(g)


def _multi_tensor_rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    *,
    step_size_min: float,
    step_size_max: float,
    etaminus: float,
    etaplus: float,
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
        check_capturable(params, state_steps, supports_xla=True)

    groups = group_by_device_and_dtype([params, grads, prevs, step_sizes, state_steps])
    for (g_params, g_grads, g_prevs, g_deltas, g_steps), _ in groups.values():
        increment_steps(g_steps)

        if has_complex:
            view_complex_as_real(g_params, g_grads, g_prevs, g_deltas)

        factors = torch._foreach_mul(g_grads, g_prevs)
        if maximize:
            torch._foreach_neg_(factors)

        # prev's storage now holds the (possibly negated) current gradient; it is edited
        # in place below, which is also how the new `prev` ends up stored.
        torch._foreach_copy_(g_prevs, g_grads)
        if maximize:
            torch._foreach_neg_(g_prevs)
        cur = g_prevs

        torch._foreach_sign_(factors)
        for f in factors:
            _sign_to_factor_(f, etaminus, etaplus, capturable)

        torch._foreach_mul_(g_deltas, factors)
        for d in g_deltas:
            d.clamp_(step_size_min, step_size_max)

        for c, f in zip(cur, factors):
            c.copy_(torch.where(f.eq(etaminus), 0, c))
        del factors

        torch._foreach_addcmul_(g_params, [c.sign() for c in cur], g_deltas, value=-1)


def rprop(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    state_steps: list[Tensor],
    # Positional-with-default flags kept in torch's order for API compatibility.
    foreach: bool | None = None,
    capturable: bool = False,
    maximize: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    step_size_min: float,
    step_size_max: float,
    etaminus: float,
    etaplus: float,
) -> None:
    """Functional Rprop step over lists of tensors (see optparity.optim.Rprop)."""
    impl = pick_kernel(
        _single_tensor_rprop, _multi_tensor_rprop, params, state_steps, foreach, differentiable
    )
    impl(
        params,
        grads,
        prevs,
        step_sizes,
        state_steps,
        step_size_min=step_size_min,
        step_size_max=step_size_max,
        etaminus=etaminus,
        etaplus=etaplus,
        capturable=capturable,
        maximize=maximize,
        differentiable=differentiable,
        has_complex=has_complex,
    )
