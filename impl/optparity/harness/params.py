"""Parameter sets and gradients for a case, rebuilt identically for every optimizer under test.

Each set covers the awkward shapes: a 0-dim tensor, a non-contiguous view with gaps, a frozen
parameter (never has a grad), a parameter whose grad is None on some steps, and exact zeros in
a gradient (sign-sensitive algorithms such as Rprop care)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class ParamSet:
    params: list[Tensor]  # what the optimizer is given
    leaves: list[Tensor]  # autograd leaves behind them (differentiable cases); else == params
    names: list[str]
    groups: list[tuple[list[int], dict]]  # (param indices, hyperparameter overrides)
    add_later: bool = False  # groups after the first go to add_param_group, not the constructor
    # Edge-condition sets (harness/params.py, below) make their own gradients: (seed, step) -> grads.
    grad_maker: Callable[[int, int], list] | None = None
    # Where the tensors live (harness/matrix.py's Case.device): every set is drawn on the CPU with
    # the same generator and then moved (to_device), so a CUDA case starts from the CPU case's numbers.
    device: str = "cpu"


def _randn(gen: torch.Generator, shape, dtype: torch.dtype) -> Tensor:
    # Draw in float64 and round once, so float32 and float64 cases see the same numbers.
    if dtype.is_complex:
        real = torch.randn((*shape, 2), generator=gen, dtype=torch.float64)
        return torch.view_as_complex(real).to(dtype)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return {torch.float32: torch.complex64, torch.float64: torch.complex128}.get(dtype, dtype)


def to_device(t: Tensor, device: str) -> Tensor:
    """`t` on `device`, laid out as it is here: same sizes, strides and storage offset (a plain
    .to() would make a gapped view contiguous), same bits. Sparse tensors keep their indices and
    values in order (and so their coalesced flag). A tensor already there is returned as is."""
    target = torch.device(device)
    if t.device == target or (target.type == "cpu" and t.is_cpu):  # "cpu:0" is the CPU too
        return t
    if t.is_sparse:
        return t.to(device)
    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
    moved = whole.to(device)
    if moved.device == whole.device and moved.data_ptr() == whole.data_ptr():  # "cuda" named cuda:0
        return t
    return moved.as_strided(t.size(), t.stride(), t.storage_offset())


def _moved(pset: ParamSet, device: str, differentiable: bool) -> ParamSet:
    """`pset` (built on the CPU) moved to `device` in place, wrapped as make_params wraps it: a
    trainable differentiable parameter is again a non-leaf clone of its leaf, retaining its grad."""
    leaves, params = [], []
    for leaf, param in zip(pset.leaves, pset.params):
        t = to_device(leaf.detach(), device)
        if differentiable and param is not leaf:
            t.requires_grad_(True)
            moved = t.clone(memory_format=torch.preserve_format)
            moved.retain_grad()
            leaves.append(t)
            params.append(moved)
        else:
            t.requires_grad_(leaf.requires_grad)
            leaves.append(t)
            params.append(t)
    pset.leaves, pset.params, pset.device = leaves, params, device  # grad makers read pset.params
    return pset


def make_params(param_set: str, dtype: torch.dtype, seed: int, second_group: dict,
                differentiable: bool = False, device: str = "cpu") -> ParamSet:
    """The parameter set `param_set`, drawn on the CPU; on `device` when that is not "cpu"."""
    pset = _make_params(param_set, dtype, seed, second_group, differentiable)
    return pset if device == "cpu" else _moved(pset, device, differentiable)


def _make_params(param_set: str, dtype: torch.dtype, seed: int, second_group: dict,
                 differentiable: bool) -> ParamSet:
    if param_set.startswith(COVER_PREFIX):
        return _compose(param_set, dtype, seed, second_group, differentiable)
    if param_set in EDGE_SETS:
        return EDGE_SETS[param_set](dtype, seed, differentiable)
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
    """Gradients for `step` (1-based), the same for every optimizer of a case, drawn on the CPU
    and moved to the parameters' device."""
    grads = _make_grads(pset, seed, step)
    if pset.device == "cpu":
        return grads
    return [None if g is None else to_device(g, pset.device) for g in grads]


def _make_grads(pset: ParamSet, seed: int, step: int) -> list[Tensor | None]:
    if pset.grad_maker is not None:
        return pset.grad_maker(seed, step)
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


# --- Edge-condition sets (harness/matrix.py's axes; docs/matrix.md says which case
# covers which condition). Each builds its own gradients, drawn per (seed, step) like the rest.

CHUNK = 65536  # elements per chunk of torch's chunked multi-tensor kernels
GRAIN = 32768  # torch's intra-op grain size: below it a kernel runs on one thread
# Lengths straddling every SIMD tail width (8 and 16 lanes) at several remainders, each above 64
# so that no other set holds such a tail after a full vector.
TAIL_LENGTHS = (65, 66, 67, 68, 70, 71, 73, 76, 79, 83, 90, 95, 97, 111, 127, 129, 143, 255, 257)
MANY = 150  # tensors in one group: more than one CUDA multi-tensor launch holds (110 at most)
SMALL = 64  # largest tensor of the non-size edge sets


def _finish(tensors: list[Tensor], names: list[str], differentiable: bool, grad_maker,
            trainable=lambda name: True) -> ParamSet:
    leaves, params = [], []
    for name, t in zip(names, tensors):
        if differentiable and trainable(name):
            leaf = t.detach().requires_grad_(True)
            param = leaf.clone(memory_format=torch.preserve_format)
            param.retain_grad()
            leaves.append(leaf)
            params.append(param)
        else:
            t.requires_grad_(trainable(name))
            leaves.append(t)
            params.append(t)
    pset = ParamSet(params, leaves, names, [(list(range(len(params))), {})])
    pset.grad_maker = lambda seed, step: grad_maker(pset, seed, step)
    return pset


def _like(p: Tensor, g: Tensor) -> Tensor:
    """`g` laid out with p's strides (what autograd's AccumulateGrad gives a dense parameter)."""
    return torch.empty_like(p).copy_(g)


def _plain_grads(pset: ParamSet, seed: int, step: int) -> list[Tensor | None]:
    gen = torch.Generator().manual_seed(seed * 1009 + step)
    return [None if not p.requires_grad else _like(p, _randn(gen, p.shape, p.dtype)) for p in pset.params]


def _sizes(dtype, seed, differentiable, big=(2 * CHUNK + 37,)):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n,) for n in TAIL_LENGTHS] + [(n,) for n in big]
    names = [f"len{n}" for n in TAIL_LENGTHS] + [f"len{n}" for n in big]
    return _finish([_randn(gen, s, dtype) for s in shapes], names, differentiable, _plain_grads)


def _sizes_full(dtype, seed, differentiable):
    # 2^20 + 3 elements (16 chunks and a tail), and a 2-D one whose rows are not a vector multiple.
    pset = _sizes(dtype, seed, differentiable, big=(2 * CHUNK + 37, (1 << 20) + 3))
    gen = torch.Generator().manual_seed(seed + 1)
    extra = _randn(gen, (1031, 129), dtype).requires_grad_(True)
    pset.params.append(extra)
    pset.leaves.append(extra)
    pset.names.append("rows1031x129")
    pset.groups = [(list(range(len(pset.params))), {})]
    return pset


def _many(dtype, seed, differentiable, count=MANY):
    gen = torch.Generator().manual_seed(seed)
    shapes = [((1 + (7 * i) % 23),) if i % 5 else (2, 1 + i % 4) for i in range(count)]
    return _finish([_randn(gen, s, dtype) for s in shapes], [f"t{i}" for i in range(count)], differentiable,
                   _plain_grads)


def _layouts(dtype, seed, differentiable):
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    tensors = {
        "channels_last": _randn(gen, (2, 2, 3, 5), dtype).contiguous(memory_format=cl),
        "channels_last_grad_contiguous": _randn(gen, (2, 3, 2, 5), dtype).contiguous(memory_format=cl),
        "contiguous_grad_channels_last": _randn(gen, (2, 3, 2, 5), dtype),
        "transposed": _randn(gen, (5, 7), dtype).t(),
        "transposed_grad_contiguous": _randn(gen, (7, 5), dtype).t(),
        "contiguous_grad_transposed": _randn(gen, (6, 5), dtype),
        "gapped_3d": _randn(gen, (3, 9, 2), dtype)[:, 1::3, :],
        "storage_offset": _randn(gen, (50,), dtype)[9:],
    }

    def grads(pset, seed, step):
        g_gen = torch.Generator().manual_seed(seed * 1009 + step)
        out = []
        for name, p in zip(pset.names, pset.params):
            g = _randn(g_gen, p.shape, p.dtype)
            if name in ("channels_last", "transposed", "storage_offset"):
                g = _like(p, g)  # same strides as the parameter
            elif name == "contiguous_grad_channels_last":
                g = g.contiguous(memory_format=cl)
            elif name == "contiguous_grad_transposed":
                g = g.t().contiguous().t()  # same shape, column-major
            out.append(g)  # the rest: contiguous, so their strides differ from the parameter's
        return out

    return _finish(list(tensors.values()), list(tensors), differentiable, grads)


def _special(dtype) -> dict[str, float]:
    fi = torch.finfo(dtype)
    return {"tiny": fi.tiny, "subnormal": fi.tiny * 2 ** -3, "huge": fi.max / 4, "sqrt_max": fi.max ** 0.5,
            "sqrt_tiny": fi.tiny ** 0.5}


def _values(dtype, seed, differentiable):
    """NaN, +-inf, subnormals, -0.0, exact zeros, huge and tiny magnitudes: in gradients, and in
    parameters and state where a step takes them there (huge grads overflow squared state)."""
    gen = torch.Generator().manual_seed(seed)
    sp = _special(torch.float64 if dtype.is_complex else dtype)
    n = 20
    base = {name: _randn(gen, (n,), dtype) for name in
            ("nan_grad", "inf_grad", "subnormal_grad", "signed_zeros", "huge_grad", "tiny_grad", "huge_param")}
    base["subnormal_grad"] = base["subnormal_grad"].mul(sp["subnormal"]).to(dtype)  # params subnormal too
    base["signed_zeros"] = torch.tensor([0.0, -0.0] * (n // 2), dtype=dtype)
    base["huge_param"] = (base["huge_param"].double().sign() * sp["huge"]).to(dtype)

    def grads(pset, seed, step):
        g_gen = torch.Generator().manual_seed(seed * 1009 + step)
        out = []
        for name, p in zip(pset.names, pset.params):
            g = torch.randn(p.shape, generator=g_gen, dtype=torch.float64)
            if name == "nan_grad" and step % 5 == 3:
                g[step % n] = float("nan")
            elif name == "inf_grad" and step % 4 == 2:
                g[1], g[n - 2] = float("inf"), float("-inf")
            elif name == "subnormal_grad":
                g = g * sp["subnormal"]
            elif name == "signed_zeros":
                g = torch.tensor([0.0, -0.0, -0.0, 0.0] * (n // 4), dtype=torch.float64)
                if step % 2:
                    g = -g
                g[step % n] = 1e-3 * step  # one moving nonzero keeps the state interesting
            elif name == "huge_grad":
                g = g.sign() * sp["sqrt_max"] * 64  # squares overflow to inf, even times (1 - beta2)
            elif name == "tiny_grad":
                g = g * sp["sqrt_tiny"] * 0.5  # squares underflow into subnormals and zero
            out.append(g.to(p.dtype))
        return out

    return _finish(list(base.values()), list(base), differentiable, grads)


def _dtype_mix(dtype, seed, differentiable):
    """One group holding float32, float64, bfloat16 and float16 tensors (`dtype` picks which
    low-precision ones: float64 for an algorithm without them)."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [("f32", torch.float32, (7,)), ("f64", torch.float64, (5, 3)), ("bf16", torch.bfloat16, (19,)),
             ("f16", torch.float16, (33,)), ("f32_gapped", torch.float32, (4, 8)), ("bf16_0d", torch.bfloat16, ())]
    if dtype == torch.float64:
        kinds = [k for k in kinds if k[1] in (torch.float32, torch.float64)]
    tensors = [_randn(gen, shape, dt) for _, dt, shape in kinds]
    for i, (name, _, _) in enumerate(kinds):
        if name == "f32_gapped":
            tensors[i] = tensors[i][:, ::2]
    return _finish(tensors, [k[0] for k in kinds], differentiable, _plain_grads)


EDGE_SETS: dict[str, Callable[..., ParamSet]] = {
    "sizes": _sizes, "sizes_full": _sizes_full, "many": _many,
    "many_full": lambda dtype, seed, diff: _many(dtype, seed, diff, count=3 * MANY),
    "layouts": _layouts, "values": _values, "dtype_mix": _dtype_mix,
}


# --- Degenerate shapes (issue 17): what real models have besides ordinary weights. Zero-element
# parameters (an empty bias, a zero-width adapter) first, in the middle and last of the group, and
# of each dtype group when a dtype mix splits it (the third field: which dtype group, see
# compose()); one-element tensors; a 0-dim tensor among 4096-element ones; 1x4096 and 4096x1.
DEGENERATE = (
    ("empty_first", (0,), 0), ("empty_first_other_dtype", (0, 3), 1), ("scalar0d", (), 0),
    ("one_by_one", (1, 1), 1), ("row_1x4096", (1, 4096), 0), ("empty_middle_other_dtype", (0,), 1),
    ("empty_middle", (3, 0), 0), ("wide_2x2048", (2, 2048), 1), ("one_element", (1,), 0),
    ("empty_last_other_dtype", (2, 0, 3), 1), ("column_4096x1", (4096, 1), 0), ("empty_last", (0, 5), 0),
)


def _degenerate(dtype, seed, differentiable):
    gen = torch.Generator().manual_seed(seed)
    tensors = [_randn(gen, shape, dtype) for _, shape, _ in DEGENERATE]
    return _finish(tensors, [name for name, _, _ in DEGENERATE], differentiable, _plain_grads)


EDGE_SETS["degenerate"] = _degenerate


def _degenerate_nonempty(dtype, seed, differentiable):
    """The degenerate set without its zero-element tensors (for a class that refuses them)."""
    pset = _degenerate(dtype, seed, differentiable)
    keep = [i for i, p in enumerate(pset.params) if p.numel()]
    pset.params, pset.leaves = [pset.params[i] for i in keep], [pset.leaves[i] for i in keep]
    pset.names, pset.groups = [pset.names[i] for i in keep], [(list(range(len(keep))), {})]
    return pset


EDGE_SETS["degenerate_nonempty"] = _degenerate_nonempty
EDGE_SETS["tails"] = lambda dtype, seed, differentiable: _sizes(dtype, seed, differentiable, big=())

# --- Composed sets (harness/covering.py): "cover:SHAPES+ELEMENTS+GRADS+GROUPS", each part one
# factor of the covering design, so any two conditions can meet in one optimizer:
#   SHAPES   plain (the "mixed" set), degenerate, layouts, sizes: the tensors and their gradients;
#   ELEMENTS uniform; dtype_mix (the second dtype group's tensors in OTHER_DTYPE[dtype]); complex
#            (the second group's tensors complex);
#   GRADS    dense; sparse (COO gradients, uncoalesced, on two tensors of every three);
#   GROUPS   one; groups (two, the second with the description's overrides); added_group (the
#            second given to add_param_group).
COVER_PREFIX = "cover:"
SHAPES = ("plain", "degenerate", "layouts", "sizes")  # "degenerate_nonempty" where empties are refused
# float16 only beside float16: GradScaler.unscale_ refuses float16 gradients (allow_fp16=False)
OTHER_DTYPE = {torch.float32: torch.bfloat16, torch.float64: torch.float32, torch.bfloat16: torch.float32,
               torch.float16: torch.float32}


def composed_name(shape: str, elements: str, grads: str, groups: str) -> str:
    return f"{COVER_PREFIX}{shape}+{elements}+{grads}+{groups}"


def features(param_set: str) -> set[str]:
    """The conditions a parameter set builds, by name: {"layouts"} for "layouts", each part of a
    composed set ("cover:layouts+dtype_mix+sparse+groups"), "sparse" for every sparse-gradient set,
    "sizes" for sizes_full, "groups" for the *_groups sets."""
    if param_set.startswith(COVER_PREFIX):
        return set(param_set[len(COVER_PREFIX):].split("+"))
    out = {param_set}
    if param_set.startswith("sparse"):
        out.add("sparse")
    if param_set.startswith("sizes"):
        out.add("sizes")
    for g in ("groups", "added_group"):
        if param_set.endswith(g):
            out.add(g)
    return out


def _second_slot(names: list[str]) -> list[bool]:
    """Which tensors form the second dtype group: the degenerate set says, elsewhere every other one."""
    slots = {name: slot for name, _, slot in DEGENERATE}
    return [bool(slots[n]) if n in slots else bool(i % 2) for i, n in enumerate(names)]


def _recast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t`'s numbers in `dtype`, its strides kept where it is dense (channels_last, transposed);
    complex ones get an imaginary part of -0.5 x the real one."""
    out = torch.empty_like(t, dtype=dtype)
    if dtype.is_complex:
        out.real.copy_(t)
        out.imag.copy_(t * -0.5)
    else:
        out.copy_(t)
    return out


def _compose(param_set: str, dtype: torch.dtype, seed: int, second_group: dict, differentiable: bool) -> ParamSet:
    shape, elements, grads, groups = param_set[len(COVER_PREFIX):].split("+")
    if differentiable:
        raise ValueError(f"{param_set}: composed sets are not built for differentiable=True")
    # "sizes" here is the SIMD tails alone: the chunk-sized tensors are the sizes axis's own
    # (their 131,109 elements made a composed case fifty times dearer)
    base = {"plain": "mixed", "sizes": "tails"}.get(shape, shape)
    pset = _make_params(base, dtype, seed, {}, False)
    second = _second_slot(pset.names)
    if elements != "uniform":
        other = _complex_of(dtype) if elements == "complex" else OTHER_DTYPE[dtype]
        for i, t in enumerate(pset.params):
            if second[i]:
                pset.params[i] = pset.leaves[i] = _recast(t.detach(), other).requires_grad_(t.requires_grad)
    n = len(pset.params)
    half = [list(range(n // 2)), list(range(n // 2, n))]
    pset.groups = [(half[0], {}), (half[1], dict(second_group))] if groups != "one" else [(list(range(n)), {})]
    pset.add_later = groups == "added_group"
    if grads == "sparse":
        inner = pset.grad_maker or (lambda s, k: _make_grads(_without_maker(pset), s, k))
        pset.grad_maker = lambda s, k: _sparsified(pset, inner(s, k), k)
    return pset


def _without_maker(pset: ParamSet) -> ParamSet:
    return ParamSet(pset.params, pset.leaves, pset.names, pset.groups)


def _sparsified(pset: ParamSet, grads: list, step: int) -> list:
    """Two gradients of every three as sparse COO tensors (uncoalesced, see _sparse_grad); empty
    tensors keep dense gradients (a COO tensor of a zero-element shape says nothing more)."""
    out = []
    for i, (name, g) in enumerate(zip(pset.names, grads)):
        if g is not None and i % 3 != 2 and g.numel() and not g.is_sparse:
            g = _sparse_grad(f"sparse_{name}", g.contiguous(), step)
        out.append(g)
    return out
