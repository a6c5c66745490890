"""Muon (Jordan et al., 2024) as torch.optim._muon computes it, op for op.

Momentum is kept with `lerp_` (Nesterov: the grad lerped towards the buffer), then the update
is orthogonalised by a quintic Newton-Schulz iteration run in bfloat16, whatever the param's
dtype, on the wide orientation of the matrix (a tall one is transposed there and back). The
param then gets decoupled weight decay and the update scaled by a shape-dependent lr.

Follows the installed torch where upstream changed after 2.13 (optparity.versions): from 2.14 the
iteration starts from a bfloat16 *copy* (2.13's `.bfloat16()` is the tensor itself when it is
already bfloat16, so the in-place normalisation wrote into it: a bfloat16 momentum buffer without
Nesterov), and adjust_lr_fn "spectral_unclamped" (sqrt(A/B)) exists."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optparity import versions
from optparity.functional._common import to_scalar

__all__ = ["muon", "zeropower_via_newtonschulz", "adjust_lr"]

EPS = 1e-7
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
DEFAULT_NS_STEPS = 5
# torch 2.14 changed these (module docstring)
COPIES_INPUT = versions.at_least("2.14")
ADJUST_LR_FNS = ("original", "match_rms_adamw") + (("spectral_unclamped",) if versions.at_least("2.14") else ())


def zeropower_via_newtonschulz(grad: Tensor, ns_coefficients: tuple[float, float, float],
                               ns_steps: int, eps: float) -> Tensor:
    """Approximately U V^T of grad = U S V^T, in bfloat16 (torch's _zeropower_via_newtonschulz)."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.to(dtype=torch.bfloat16, copy=True) if COPIES_INPUT else grad.bfloat16()
    if tall:
        x = x.T  # iterate on the smaller Gram matrix
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        # b*A + c*A@A, then a*X + (that)@X: addmm keeps torch's rounding
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    if tall:
        x = x.T
    return x


def adjust_lr(lr: float, adjust_lr_fn: str | None, param_shape: torch.Size) -> float:
    """The lr scaled for the matrix's shape: Keller Jordan's sqrt(max(1, A/B)) ("original",
    the default), Moonshot's 0.2*sqrt(max(A, B)) ("match_rms_adamw"), from torch 2.14 Bernstein's
    sqrt(A/B) ("spectral_unclamped"); anything else: as is."""
    rows, cols = param_shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    elif adjust_lr_fn == "spectral_unclamped" and "spectral_unclamped" in ADJUST_LR_FNS:
        ratio = math.sqrt(rows / cols)
    else:
        ratio = 1.0
    return lr * ratio


def _single_tensor_muon(
    params: list[Tensor],
    grads: list[Tensor],
    muon_momentum_bufs: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    has_complex: bool,
) -> None:
    lr = to_scalar(lr)
    if has_complex:
        raise ValueError("Complex parameters are not supported")

    for i, param in enumerate(params):
        grad = grads[i]
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
        buf = muon_momentum_bufs[i]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf
        update = zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
        scaled_lr = adjust_lr(lr, adjust_lr_fn, param.shape)
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-scaled_lr)


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    muon_momentum_bufs: list[Tensor],
    *,
    foreach: bool | None = None,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
    has_complex: bool,
) -> None:
    """Functional Muon (see optparity.optim.Muon); torch has no foreach path for it yet."""
    if foreach:
        raise RuntimeError("Foreach is not supported for Muon yet")
    _single_tensor_muon(
        params,
        grads,
        muon_momentum_bufs,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=nesterov,
        ns_coefficients=ns_coefficients,
        ns_steps=ns_steps,
        eps=eps,
        adjust_lr_fn=adjust_lr_fn,
        has_complex=has_complex,
    )
