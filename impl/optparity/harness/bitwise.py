"""The bitwise comparison: the one place that decides whether two tensors are "the same".

Same means: same dtype, same shape, and the same bit pattern in every element, except that
NaNs match any NaN in the same position (payloads are not part of the contract). -0.0 and
0.0 differ. Where they differ we measure, over the elements where both sides are finite, the
distance in ULPs (how many representable values of the dtype lie between the two numbers,
computed exactly: Python ints, never an overflowing int64), the absolute error and the relative
error. A NaN against a number and an infinity against anything else are counted as their own
kinds, never turned into a distance.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import Tensor

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
_EXACT_IN_DOUBLE = 1 << 53  # below this an ULP count held in a float64 is exact

REL_ERROR_CAP = 1e3  # a relative error beyond this says only "the reference is (near) zero"


def readable_ulp(n: int | None) -> str:
    """An ULP count for people: exact up to 2^53, "huge (>2^53)" beyond (a sign flip or a
    value near zero against one that is not; the exact figure stays in JSON)."""
    if n is None:
        return "-"
    return str(n) if n <= _EXACT_IN_DOUBLE else "huge (>2^53)"


def readable_rel(x: float | None) -> str:
    """A relative error for people: capped at REL_ERROR_CAP (the exact figure stays in JSON)."""
    if x is None:
        return "-"
    return f"{x:.3g}" if x <= REL_ERROR_CAP else f">{REL_ERROR_CAP:.0e} (reference near zero)"


# Kinds of element mismatch.
VALUE, NAN, INF = "value", "nan", "inf"


@dataclass(frozen=True)
class Difference:
    """Where two tensors first differ, and by how much overall."""

    reason: str  # "dtype", "shape", "value" or "type"
    index: tuple[int, ...] | None = None  # first differing element
    candidate: float | complex | None = None  # at `index`
    reference: float | complex | None = None
    abs_error: float | None = None  # at `index`
    ulp: int | None = None  # at `index`; None when that element is a NaN/inf mismatch
    max_ulp: int | None = None  # over the elements where both sides are finite; None if none differ
    mismatched: int = 0  # number of differing elements
    kind: str = VALUE  # of the element at `index`: VALUE, NAN (NaN vs a number) or INF
    nan_mismatches: int = 0  # elements where exactly one side is NaN
    inf_mismatches: int = 0  # elements where an infinity meets a finite number or the other infinity
    max_abs_error: float | None = None  # over finite pairs
    max_rel_error: float | None = None  # |c - r| / max(|r|, smallest normal), over finite pairs
    worst_index: tuple[int, ...] | None = None  # element with the largest ULP distance
    # max|c - r| / (eps * max|r|) over finite pairs: the error in roundings of the tensor's own scale,
    # which cancellation in a small element does not inflate (rounding-level vs different math).
    scaled_error: float | None = None
    numeric: bool = False  # a tensor value difference (as opposed to dtype/shape/type/setting)

    def describe(self) -> str:
        if self.reason != "value":
            return f"{self.reason} differs: candidate {self.candidate}, reference {self.reference}"
        if not self.numeric:
            return f"value differs: candidate {self.candidate}, reference {self.reference}"
        at = {VALUE: f"{readable_ulp(self.ulp)} ulp", NAN: "NaN vs a number", INF: "infinity mismatch"}[self.kind]
        if self.ulp is None and self.kind == VALUE:
            at = "not a float"
        text = (f"element {list(self.index)}: candidate {self.candidate!r} vs reference {self.reference!r} "
                f"(abs err {self.abs_error:.3g}, {at}; {self.mismatched} element(s) differ")
        if self.max_ulp is not None:
            text += (f", max {readable_ulp(self.max_ulp)} ulp at {list(self.worst_index)}, "
                     f"max rel err {readable_rel(self.max_rel_error)}")
        if self.nan_mismatches:
            text += f", {self.nan_mismatches} NaN vs number"
        if self.inf_mismatches:
            text += f", {self.inf_mismatches} inf mismatch"
        return text + ")"


# True inside a case that compares across devices (across_devices below).
_ACROSS: contextvars.ContextVar[bool] = contextvars.ContextVar("optparity_across_devices", default=False)


@contextlib.contextmanager
def across_devices():
    """Inside: tensors may sit on different devices. A candidate on CUDA against a reference on the
    CPU cannot be told where torch's CUDA path keeps its counters, so placement is not compared
    there (values are, moved to the CPU); everywhere else a tensor's device must be the reference's."""
    token = _ACROSS.set(True)
    try:
        yield
    finally:
        _ACROSS.reset(token)


def _real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _sign_magnitude(t: Tensor) -> tuple[Tensor, Tensor]:
    """(sign bit set, magnitude bits) as bool / int64 tensors; the magnitude fits int64 for every width."""
    bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    width = t.element_size() * 8
    return bits < 0, bits & ((1 << (width - 1)) - 1)


def _ordered(negative: bool, magnitude: int) -> int:
    """Monotone map of a float's bits to a Python int: -0.0 -> -1, +0.0 -> 0."""
    return -magnitude - 1 if negative else magnitude


def ulps_between(a: float, b: float, dtype: torch.dtype = torch.float64) -> int:
    """Exact ULP distance between two finite numbers of `dtype` (a Python int, no overflow)."""
    t = torch.tensor([a, b], dtype=dtype)
    neg, mag = _sign_magnitude(t)
    return abs(_ordered(bool(neg[0]), int(mag[0])) - _ordered(bool(neg[1]), int(mag[1])))


def same_bits(candidate: Tensor, reference: Tensor) -> bool:
    return compare(candidate, reference) is None


def compare(candidate: Tensor, reference: Tensor) -> Difference | None:
    """None when the tensors are bit-identical (NaN matches NaN), else where and how they differ."""
    # The common case first, in as few torch calls as possible (a check makes hundreds of
    # thousands of these): two dense real CPU float tensors with the same bits.
    if (type(candidate) is Tensor and type(reference) is Tensor and candidate.dtype is reference.dtype
            and candidate.dtype in _INT_VIEW and candidate.is_cpu and reference.is_cpu
            and candidate.layout is torch.strided and reference.layout is torch.strided
            and candidate.shape == reference.shape):
        view = _INT_VIEW[candidate.dtype]
        c = candidate.detach() if candidate.requires_grad else candidate
        r = reference.detach() if reference.requires_grad else reference
        if torch.equal(c.view(view), r.view(view)):
            return None
    if not isinstance(candidate, Tensor) or not isinstance(reference, Tensor):
        return Difference("type", candidate=type(candidate).__name__, reference=type(reference).__name__)
    if candidate.device != reference.device and not _ACROSS.get():
        # e.g. a `step` counter kept on the CPU where torch keeps it on the parameter's device
        return Difference("device", candidate=str(candidate.device), reference=str(reference.device))
    if candidate.dtype != reference.dtype:
        return Difference("dtype", candidate=str(candidate.dtype), reference=str(reference.dtype))
    if candidate.shape != reference.shape:
        return Difference("shape", candidate=tuple(candidate.shape), reference=tuple(reference.shape))
    if candidate.layout != reference.layout:
        return Difference("layout", candidate=str(candidate.layout), reference=str(reference.layout))
    if candidate.is_sparse:  # e.g. SGD's momentum buffer under sparse grads
        if candidate.is_coalesced() != reference.is_coalesced():
            return Difference("coalesced", candidate=candidate.is_coalesced(), reference=reference.is_coalesced())
        # the same entries in the same order, then the same bits in each (index: into the values)
        return (compare(candidate._indices(), reference._indices())
                or compare(candidate._values(), reference._values()))
    cand = _real_view(candidate.detach()).cpu()
    ref = _real_view(reference.detach()).cpu()
    if cand.dtype not in _INT_VIEW:  # integer and bool tensors: plain equality
        if torch.equal(cand, ref):
            return None
        return _integer_difference(candidate, reference, cand != ref)
    bits_c = cand.view(_INT_VIEW[cand.dtype])
    bits_r = ref.view(_INT_VIEW[ref.dtype])
    if torch.equal(bits_c, bits_r):  # the common case, and the cheap one
        return None
    nan_c, nan_r = torch.isnan(cand), torch.isnan(ref)
    differ = (bits_c != bits_r) & ~(nan_c & nan_r)
    if not bool(differ.any()):
        return None
    finite = torch.isfinite(cand) & torch.isfinite(ref)
    nan_kind = differ & (nan_c ^ nan_r)
    inf_kind = differ & ~finite & ~nan_kind
    measured = differ & finite

    neg_c, mag_c = _sign_magnitude(cand)
    neg_r, mag_r = _sign_magnitude(ref)

    max_ulp = worst = max_abs = max_rel = scaled = None
    if bool(measured.any()):
        max_ulp, worst_flat = _largest_distance(neg_c, mag_c, neg_r, mag_r, measured)
        worst = _element(candidate, ref.shape, worst_flat)
        c64, r64 = cand.to(torch.float64), ref.to(torch.float64)
        abs_err = torch.where(measured, (c64 - r64).abs(), torch.zeros_like(c64))
        floor = torch.finfo(cand.dtype).tiny
        rel_err = abs_err / r64.abs().clamp_min(floor)
        max_abs, max_rel = float(abs_err.max()), float(rel_err.max())
        finfo = torch.finfo(cand.dtype)
        scale = float(torch.where(finite, r64.abs(), torch.zeros_like(r64)).max())
        scaled = max_abs / (finfo.eps * max(scale, finfo.tiny))

    elem_differ = differ.any(dim=-1) if candidate.is_complex() else differ
    first = _first(elem_differ)
    c_val = candidate.detach().cpu()[first].item()
    r_val = reference.detach().cpu()[first].item()
    comp = (nan_kind | inf_kind)[first]
    kind = (NAN if bool(nan_kind[first].any()) else INF) if bool(comp.any()) else VALUE
    ulp = None
    if kind == VALUE:
        sub = measured[first].reshape(-1)  # one component, or (re, im)
        base = _flat_index(ref.shape, first)
        ulp = max(_exact(neg_c, mag_c, neg_r, mag_r, base + k) for k in range(sub.numel()) if bool(sub[k]))
    return Difference(
        "value", index=first, candidate=c_val, reference=r_val, abs_error=float(abs(c_val - r_val)),
        ulp=ulp, max_ulp=max_ulp, mismatched=int(elem_differ.sum()), kind=kind,
        nan_mismatches=_count(nan_kind, candidate), inf_mismatches=_count(inf_kind, candidate),
        max_abs_error=max_abs, max_rel_error=max_rel, worst_index=worst, scaled_error=scaled, numeric=True,
    )


def _exact(neg_c, mag_c, neg_r, mag_r, flat: int) -> int:
    """The exact ULP distance of flat element `flat` (a Python int)."""
    return abs(_ordered(bool(neg_c.reshape(-1)[flat]), int(mag_c.reshape(-1)[flat]))
               - _ordered(bool(neg_r.reshape(-1)[flat]), int(mag_r.reshape(-1)[flat])))


def _largest_distance(neg_c, mag_c, neg_r, mag_r, measured: Tensor) -> tuple[int, int]:
    """(largest ULP distance over the `measured` elements, its flat index), exactly: distances are
    ranked by a float64 estimate, and ties at the top recomputed as Python ints when the
    estimate is past the range where a double holds them exactly."""
    same_sign = (mag_c - mag_r).abs().to(torch.float64)
    cross_sign = mag_c.to(torch.float64) + mag_r.to(torch.float64) + 1.0
    approx = torch.where(neg_c == neg_r, same_sign, cross_sign)
    flat_approx = torch.where(measured, approx, torch.zeros_like(approx)).reshape(-1)
    top = float(flat_approx.max())
    if top < _EXACT_IN_DOUBLE:
        return int(top), int(flat_approx.argmax())
    # rounding to double is monotone, so the true maximum is among the ties
    ties = (flat_approx == top).nonzero().reshape(-1).tolist()
    best, flat = max((_exact(neg_c, mag_c, neg_r, mag_r, i), i) for i in ties)
    return best, flat


def max_ulp(candidate: Tensor, reference: Tensor) -> int | None:
    """compare(candidate, reference).max_ulp without the rest of compare's report (0 when no
    pair of finite elements differs): the cheap measure for distances that are only reported.
    None when the two cannot be measured (not same-dtype, same-shape dense float tensors)."""
    if (not isinstance(candidate, Tensor) or not isinstance(reference, Tensor) or candidate.dtype != reference.dtype
            or candidate.shape != reference.shape or candidate.layout != torch.strided
            or reference.layout != torch.strided):
        return None
    cand = _real_view(candidate.detach()).cpu()
    ref = _real_view(reference.detach()).cpu()
    if cand.dtype not in _INT_VIEW:
        return None
    if torch.equal(cand.view(_INT_VIEW[cand.dtype]), ref.view(_INT_VIEW[ref.dtype])):
        return 0
    neg_c, mag_c = _sign_magnitude(cand)
    neg_r, mag_r = _sign_magnitude(ref)
    measured = torch.isfinite(cand) & torch.isfinite(ref) & ((mag_c != mag_r) | (neg_c != neg_r))
    if not bool(measured.any()):
        return 0
    return _largest_distance(neg_c, mag_c, neg_r, mag_r, measured)[0]


def _first(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist()) if mask.dim() else ()


def _count(mask: Tensor, original: Tensor) -> int:
    return int((mask.any(dim=-1) if original.is_complex() else mask).sum())


def _flat_index(shape, index: tuple[int, ...]) -> int:
    """Flat offset of the first component of `index` in a contiguous tensor of `shape`."""
    flat = 0
    for size, i in zip(shape, index):
        flat = flat * size + i
    for size in shape[len(index):]:
        flat *= size
    return flat


def _element(original: Tensor, real_shape, flat: int) -> tuple[int, ...]:
    index = []
    for size in reversed(real_shape):
        index.append(flat % size)
        flat //= size
    index.reverse()
    return tuple(index[:-1]) if original.is_complex() else tuple(index)


def _integer_difference(candidate: Tensor, reference: Tensor, differ: Tensor) -> Difference:
    elem_differ = differ.any(dim=-1) if candidate.is_complex() else differ
    first = _first(elem_differ)
    c_val = candidate.detach().cpu()[first].item()
    r_val = reference.detach().cpu()[first].item()
    gap = (candidate.detach().cpu().to(torch.float64) - reference.detach().cpu().to(torch.float64)).abs()
    return Difference("value", index=first, candidate=c_val, reference=r_val,
                      abs_error=float(abs(c_val - r_val)) if not isinstance(c_val, bool) else 1.0,
                      mismatched=int(elem_differ.sum()), max_abs_error=float(gap.max()), numeric=True)


def ulp_distance(candidate: Tensor, reference: Tensor) -> int:
    """Largest ULP distance between two same-shaped float tensors (0 when bit-identical)."""
    diff = compare(candidate, reference)
    if diff is None:
        return 0
    if diff.max_ulp is None:
        raise ValueError(f"cannot measure ULPs: {diff.describe()}")
    return diff.max_ulp
