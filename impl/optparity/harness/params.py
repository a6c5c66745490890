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
    if param_set.startswith(("matrix", "sparse")):
        names, tensors = _fed_differently(param_set, gen, dtype)
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
    if param_set.endswith(("groups", "added_group")):
        groups = [([0, 1, 2], {}), ([3, 4, 5], dict(second_group))]
    else:
        groups = [(list(range(len(params))), {})]
    return ParamSet(params, leaves, names, groups, add_later=param_set.endswith("added_group"))


# Sets for algorithms fed differently (harness/algorithms/<algo>.py `kind`, `sparse_grads`),
# six tensors each like the dense sets (groups split them 3 + 3):
#   matrix, matrix_groups, matrix_added_group: 2-D only (Muon) — tall and wide (the iteration
#     transposes tall ones), a transposed view, a gapped view, frozen, grad None sometimes;
#   sparse_grads, sparse_grads_groups, sparse_grads_added_group: dense params whose grads are
#     sparse COO tensors (SparseAdam) — uncoalesced with duplicate indices, row-sparse
#     (embedding-like, duplicates), on a gapped view, 0-dim, empty (nnz 0) some steps;
#   sparse: the same with one dense grad among them (SGD and Adagrad take a mixture).
_MATRIX_NAMES = ["tall", "wide_zero_rows", "transposed_view", "gapped_view", "frozen", "grad_sometimes_none"]
_SPARSE_NAMES = ["sparse_coo", "sparse_rows", "sparse_gapped_view", "frozen", "sparse_sometimes_empty"]


def _fed_differently(param_set: str, gen: torch.Generator, dtype: torch.dtype):
    if param_set.startswith("matrix"):
        shapes = [(5, 3), (3, 6), None, None, (4, 4), (3, 3)]
        tensors = [_randn(gen, s, dtype) if s else None for s in shapes]
        tensors[2] = _randn(gen, (4, 7), dtype).t()
        tensors[3] = _randn(gen, (6, 8), dtype)[:, ::2]
        return list(_MATRIX_NAMES), tensors
    tensors = [_randn(gen, (5, 3), dtype), _randn(gen, (6, 4), dtype), _randn(gen, (6, 8), dtype)[:, ::2],
               _randn(gen, (4,), dtype), _randn(gen, (7,), dtype)]
    last = "dense_grad" if param_set == "sparse" else "sparse_scalar0d"
    tensors.append(_randn(gen, (8,) if last == "dense_grad" else (), dtype))
    return _SPARSE_NAMES + [last], tensors


def _sparse_grad(name: str, g: Tensor, step: int) -> Tensor:
    """`g` as a sparse COO tensor the way `name` asks (see _fed_differently)."""
    if name == "sparse_rows":
        rows = torch.tensor([step % g.size(0), 1, step % g.size(0), (step + 3) % g.size(0)])
        return torch.sparse_coo_tensor(rows[None], g[rows], g.shape, check_invariants=True)
    if name == "sparse_sometimes_empty" and step % 4 == 0:
        return torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.long), g[:0], g.shape, check_invariants=True)
    if g.dim() == 0:
        return torch.sparse_coo_tensor(torch.empty((0, 2), dtype=torch.long), torch.stack([g, -0.5 * g]), (),
                                       check_invariants=True)
    flat = torch.arange(g.numel()).reshape(g.shape)
    keep = (flat + step) % 3 != 0  # a third of the entries absent, a different third each step
    indices = keep.nonzero().t()
    values = g[keep]
    # two entries repeated (with other values) and the order reversed: uncoalesced
    indices = torch.cat([indices, indices[:, :2]], dim=1).flip(1)
    values = torch.cat([values, -0.5 * values[:2]]).flip(0)
    return torch.sparse_coo_tensor(indices, values, g.shape, check_invariants=True)




def make_grads(pset: ParamSet, seed: int, step: int) -> list[Tensor | None]:
    """Gradients for `step` (1-based), the same for every optimizer of a case."""
    gen = torch.Generator().manual_seed(seed * 1009 + step)
    grads: list[Tensor | None] = []
    for name, p in zip(pset.names, pset.params):
        g = _randn(gen, p.shape, p.dtype)
        if name == "frozen" or (name in ("grad_sometimes_none", "sparse_sometimes_empty") and step % 3 == 2):
            g = None
        elif name == "grad_with_zeros":
            g[::3] = 0.0
            if step % 4 == 0:
                g = -g  # flip signs so sign-tracking state sees changes
        elif name == "wide_zero_rows":
            g[1] = 0.0
            if step % 5 == 0:
                g.zero_()  # Newton-Schulz then divides by its eps, not by a norm
        elif name.startswith("sparse"):
            g = _sparse_grad(name, g, step)
        grads.append(g)
    return grads
