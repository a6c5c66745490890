"""The bitwise comparison: the one place that decides whether two tensors are "the same".

Same means: same dtype, same shape, and the same bit pattern in every element, except that
NaNs match any NaN in the same position (payloads are not part of the contract). -0.0 and
0.0 differ. Where they differ we measure the distance in ULPs: how many representable
values of the dtype lie between the two numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@dataclass(frozen=True)
class Difference:
    """Where two tensors first differ, and by how much overall."""

    reason: str  # "dtype", "shape", "value" or "type"
    index: tuple[int, ...] | None = None
    candidate: float | complex | None = None
    reference: float | complex | None = None
    abs_error: float | None = None
    ulp: int | None = None  # at `index`
    max_ulp: int | None = None  # over the whole tensor
    mismatched: int = 0  # number of differing elements

    def describe(self) -> str:
        if self.reason != "value":
            return f"{self.reason} differs: candidate {self.candidate}, reference {self.reference}"
        return (
            f"element {list(self.index)}: candidate {self.candidate!r} vs reference {self.reference!r} "
            f"(abs err {self.abs_error:.3g}, {self.ulp} ulp; {self.mismatched} element(s) differ, "
            f"max {self.max_ulp} ulp)"
        )


def _real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _ordered_bits(t: Tensor) -> Tensor:
    """Map float bits to integers whose order matches the floats' order, so that the
    difference of two is their ULP distance. -0.0 maps just below +0.0 (distance 1)."""
    bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
    width = t.element_size() * 8
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(bits < 0, -magnitude - 1, magnitude)


def same_bits(candidate: Tensor, reference: Tensor) -> bool:
    return compare(candidate, reference) is None


def compare(candidate: Tensor, reference: Tensor) -> Difference | None:
    """None when the tensors are bit-identical (NaN matches NaN), else where they first differ."""
    if not isinstance(candidate, Tensor) or not isinstance(reference, Tensor):
        return Difference("type", candidate=type(candidate).__name__, reference=type(reference).__name__)
    if candidate.dtype != reference.dtype:
        return Difference("dtype", candidate=str(candidate.dtype), reference=str(reference.dtype))
    if candidate.shape != reference.shape:
        return Difference("shape", candidate=tuple(candidate.shape), reference=tuple(reference.shape))
    cand = _real_view(candidate.detach()).cpu()
    ref = _real_view(reference.detach()).cpu()
    if cand.dtype not in _INT_VIEW:  # integer and bool tensors: plain equality
        if torch.equal(cand, ref):
            return None
        differ = cand != ref
        return _value_difference(candidate, reference, differ, ulps=None)
    bits_c = cand.view(_INT_VIEW[cand.dtype])
    bits_r = ref.view(_INT_VIEW[ref.dtype])
    if torch.equal(bits_c, bits_r):  # the common case, and the cheap one
        return None
    both_nan = torch.isnan(cand) & torch.isnan(ref)
    differ = (bits_c != bits_r) & ~both_nan
    if not bool(differ.any()):
        return None
    ulps = (_ordered_bits(cand) - _ordered_bits(ref)).abs()
    # A NaN against a number has no meaningful distance; count it as the dtype's whole range.
    one_nan = torch.isnan(cand) ^ torch.isnan(ref)
    ulps = torch.where(one_nan, torch.full_like(ulps, torch.iinfo(torch.int64).max), ulps)
    ulps = torch.where(differ, ulps, torch.zeros_like(ulps))
    return _value_difference(candidate, reference, differ, ulps)


def _value_difference(candidate: Tensor, reference: Tensor, differ: Tensor, ulps: Tensor | None) -> Difference:
    # For complex tensors `differ` covers the trailing (re, im) axis; report the complex element.
    if candidate.is_complex():
        elem_differ = differ.any(dim=-1)
        elem_ulps = ulps.amax(dim=-1) if ulps is not None else None
    else:
        elem_differ, elem_ulps = differ, ulps
    first = tuple(int(i) for i in elem_differ.nonzero()[0].tolist()) if elem_differ.dim() else ()
    c_val = candidate.detach().cpu()[first].item()
    r_val = reference.detach().cpu()[first].item()
    abs_error = abs(c_val - r_val) if not isinstance(c_val, bool) else 1.0
    return Difference(
        "value",
        index=first,
        candidate=c_val,
        reference=r_val,
        abs_error=float(abs_error),
        ulp=int(elem_ulps[first]) if elem_ulps is not None else None,
        max_ulp=int(elem_ulps.max()) if elem_ulps is not None else None,
        mismatched=int(elem_differ.sum()),
    )


def ulp_distance(candidate: Tensor, reference: Tensor) -> int:
    """Largest ULP distance between two same-shaped float tensors (0 when bit-identical)."""
    diff = compare(candidate, reference)
    if diff is None:
        return 0
    if diff.max_ulp is None:
        raise ValueError(f"cannot measure ULPs: {diff.describe()}")
    return diff.max_ulp
