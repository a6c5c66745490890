"""The comparison every verdict rests on."""
import math

import pytest
import torch

from optparity.harness.bitwise import compare, same_bits, ulp_distance

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS)
def test_identical_tensors_are_same(dtype):
    t = torch.randn(5, 3).to(dtype)
    assert same_bits(t, t.clone())


@pytest.mark.parametrize("dtype", FLOATS)
def test_negative_zero_differs_from_zero(dtype):
    # torch.equal would call these equal; bit for bit they are not.
    a, b = torch.zeros(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    b[1] = -0.0
    assert torch.equal(a, b)
    diff = compare(a, b)
    assert diff is not None and diff.index == (1,) and diff.ulp == 1


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_matches_nan_in_same_place_only(dtype):
    a = torch.tensor([1.0, math.nan, 2.0], dtype=dtype)
    assert same_bits(a, a.clone())
    b = a.clone()
    b[1] = 3.0
    assert compare(a, b).index == (1,)


def test_nan_payload_is_not_part_of_the_contract():
    a = torch.tensor([math.nan], dtype=torch.float32)
    b = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(b).all() and not torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert same_bits(a, b)


@pytest.mark.parametrize("dtype", FLOATS)
def test_one_ulp_apart(dtype):
    a = torch.tensor([1.5, -2.25], dtype=dtype)
    b = torch.nextafter(a, torch.full_like(a, 10.0))
    diff = compare(b, a)
    assert diff.ulp == 1 and diff.max_ulp == 1 and diff.mismatched == 2
    assert diff.candidate == b[0].item() and diff.reference == a[0].item()


def test_ulp_counts_across_zero():
    a = torch.tensor([torch.finfo(torch.float32).tiny], dtype=torch.float32)
    assert ulp_distance(a, -a) == 2 * (1 << 23) + 1  # both normal-min magnitudes plus the two zeros


def test_dtype_and_shape_must_match():
    a = torch.ones(3)
    assert compare(a, a.double()).reason == "dtype"
    assert compare(a, torch.ones(1, 3)).reason == "shape"
    assert compare(a, 1.0).reason == "type"


def test_complex_reports_complex_element():
    a = torch.randn(4, dtype=torch.complex64)
    b = a.clone()
    b[2] = complex(b[2].real.item(), b[2].imag.item() + 1)
    diff = compare(b, a)
    assert diff.index == (2,) and isinstance(diff.candidate, complex) and diff.mismatched == 1


def test_non_contiguous_views_compare_by_value():
    base = torch.randn(6, 8)
    view = base[:, ::2]
    assert same_bits(view, view.contiguous())


def test_integer_tensors():
    assert same_bits(torch.arange(4), torch.arange(4))
    assert compare(torch.arange(4), torch.arange(4).flip(0)).mismatched == 4
