"""Parameter sets and gradients for a case, rebuilt identically for every optimizer under test.

Each set covers the awkward shapes: a 0-dim tensor, a non-contiguous view with gaps, a frozen
parameter (never has a grad), a parameter whose grad is None on some steps, and exact zeros in
a gradient (sign-sensitive algorithms such as Rprop care)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ParamSet:
    params: list[Tensor]  # what the optimizer is given
    leaves: list[Tensor]  # autograd leaves behind them (differentiable cases); else == params
    names: list[str]
    groups: list[tuple[list[int], dict]]  # (param indices, hyperparameter overrides)
    add_later: bool = False  # groups after the first go to add_param_group, not the constructor


def _randn(gen: torch.Generator, shape, dtype: torch.dtype) -> Tensor:
    # Draw in float64 and round once, so float32 and float64 cases see the same numbers.
    if dtype.is_complex:
        real = torch.randn((*shape, 2), generator=gen, dtype=torch.float64)
        return torch.view_as_complex(real).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)


def make_params(param_set: str, dtype: torch.dtype, seed: int, second_group: dict,
                differentiable: bool = False) -> ParamSet:
    gen = torch.Generator().manual_seed(seed)
    cdtype = _complex_of(dtype) if param_set == "complex" else dtype
    scalar = _randn(gen, (), dtype)
    matrix = _randn(gen, (5, 3), cdtype)
    gapped = _randn(gen, (6, 8), cdtype)[:, ::2]  # non-contiguous, with gaps between rows' elements
    frozen = _randn(gen, (4,), dtype)
    sometimes = _randn(gen, (7,), cdtype)
    zeros_in_grad = _randn(gen, (8,), dtype)
    tensors = [scalar, matrix, gapped, frozen, sometimes, zeros_in_grad]
    names = ["scalar0d", "matrix", "gapped_view", "frozen", "grad_sometimes_none", "grad_with_zeros"]
    leaves, params = [], []
    for name, t in zip(names, tensors):
        trainable = name != "frozen"
        if differentiable and trainable:
            leaf = t.detach().clone().requires_grad_(True) if t.is_contiguous() else t.detach().requires_grad_(True)
            leaves.append(leaf)
            param = leaf.clone(memory_format=torch.preserve_format)  # a non-leaf the step may modify
            param.retain_grad()  # we set .grad on it, like a user of differentiable=True would
            params.append(param)
        else:
            t.requires_grad_(trainable)
            leaves.append(t)
            params.append(t)
    if param_set in ("groups", "added_group"):
        groups = [([0, 1, 2], {}), ([3, 4, 5], dict(second_group))]
    else:
        groups = [(list(range(len(params))), {})]
    return ParamSet(params, leaves, names, groups, add_later=param_set == "added_group")


def make_grads(pset: ParamSet, seed: int, step: int) -> list[Tensor | None]:
    """Gradients for `step` (1-based), the same for every optimizer of a case."""
    gen = torch.Generator().manual_seed(seed * 1009 + step)
    grads: list[Tensor | None] = []
    for name, p in zip(pset.names, pset.params):
        g = _randn(gen, p.shape, p.dtype)
        if name == "frozen" or (name == "grad_sometimes_none" and step % 3 == 2):
            g = None
        elif name == "grad_with_zeros":
            g[::3] = 0.0
            if step % 4 == 0:
                g = -g  # flip signs so sign-tracking state sees changes
        grads.append(g)
    return grads
