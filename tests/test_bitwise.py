"""The comparison every verdict rests on."""
import math

import pytest
import torch

from optparity.harness.bitwise import compare, max_ulp, same_bits, ulp_distance

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


# The overflow cases issue 7 lists: every distance exact, as a Python int.
@pytest.mark.parametrize("a,b,dtype,expected", [
    (3.0, -3.0, torch.float64, 9227875636482146305),
    (1e300, -1e300, torch.float64, 2 * 0x7E37E43C8800759C + 1),
    (-1e300, 1e300, torch.float64, 2 * 0x7E37E43C8800759C + 1),
    (65504.0, -65504.0, torch.float16, 2 * 0x7BFF + 1),
    (3.0, -3.0, torch.bfloat16, 2 * 0x4040 + 1),
    (3.0, -3.0, torch.float32, 2 * 0x40400000 + 1),
])
def test_ulp_distance_does_not_overflow(a, b, dtype, expected):
    x, y = torch.tensor([a], dtype=dtype), torch.tensor([b], dtype=dtype)
    diff = compare(x, y)
    assert diff.ulp == diff.max_ulp == ulp_distance(x, y) == expected
    assert isinstance(diff.max_ulp, int) and diff.kind == "value" and diff.worst_index == (0,)


def test_largest_distance_is_exact_among_many_large_ones():
    # Two distances above 2**53 that round to the same double: the larger one must win exactly.
    big = torch.tensor([1e300, 1e300], dtype=torch.float64)
    other = torch.tensor([-1e300, -torch.nextafter(torch.tensor(1e300, dtype=torch.float64),
                                                    torch.tensor(2e300, dtype=torch.float64)).item()],
                         dtype=torch.float64)
    diff = compare(big, other)
    assert diff.max_ulp == 2 * 0x7E37E43C8800759C + 2 and diff.worst_index == (1,)


@pytest.mark.parametrize("dtype", FLOATS)
def test_nan_against_a_number_is_its_own_kind(dtype):
    a = torch.tensor([1.0, 2.0, 4.0], dtype=dtype)
    b = torch.tensor([1.0, math.nan, 4.5], dtype=dtype)
    diff = compare(a, b)
    assert diff.index == (1,) and diff.kind == "nan" and diff.ulp is None
    assert diff.nan_mismatches == 1 and diff.inf_mismatches == 0 and diff.mismatched == 2
    assert diff.max_ulp == ulp_distance(a[2:], b[2:]) > 0  # only the finite pair is measured
    only_nan = compare(a[:2], b[:2])
    assert only_nan.max_ulp is None and only_nan.nan_mismatches == 1
    with pytest.raises(ValueError, match="cannot measure ULPs"):
        ulp_distance(a[:2], b[:2])


@pytest.mark.parametrize("dtype", FLOATS)
def test_infinity_against_finite_is_its_own_kind(dtype):
    a = torch.tensor([math.inf, 1.0, -math.inf], dtype=dtype)
    b = torch.tensor([3.0, 1.0, math.inf], dtype=dtype)
    diff = compare(a, b)
    assert diff.kind == "inf" and diff.inf_mismatches == 2 and diff.max_ulp is None and diff.ulp is None
    assert "infinity mismatch" in diff.describe()
    assert same_bits(torch.tensor([math.inf], dtype=dtype), torch.tensor([math.inf], dtype=dtype))


def test_abs_and_rel_error_and_worst_location():
    ref = torch.tensor([[1.0, 2.0], [100.0, 0.0]], dtype=torch.float32)
    cand = ref.clone()
    cand[0, 1] = torch.nextafter(ref[0, 1], torch.tensor(3.0))  # 1 ulp
    cand[1, 0] = 101.0  # many ulps, abs err 1, rel err 0.01
    diff = compare(cand, ref)
    assert diff.index == (0, 1) and diff.ulp == 1 and diff.worst_index == (1, 0)
    assert diff.max_ulp == ulp_distance(cand[1, 0:1], ref[1, 0:1]) > 1
    assert diff.max_abs_error == 1.0 and diff.max_rel_error == pytest.approx(0.01)


def test_relative_error_against_zero_uses_the_smallest_normal():
    ref = torch.zeros(1, dtype=torch.float32)
    cand = torch.tensor([torch.finfo(torch.float32).tiny])
    assert compare(cand, ref).max_rel_error == 1.0


def test_complex_worst_location_is_the_complex_element():
    a = torch.zeros(3, dtype=torch.complex128)
    b = a.clone()
    b[2] = complex(0.0, 1.0)
    diff = compare(b, a)
    assert diff.index == (2,) and diff.worst_index == (2,) and diff.max_abs_error == 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.complex64])
def test_max_ulp_is_compares_max_ulp(dtype):
    # the cheap measure (fused vs for-loop distances) must agree with compare() exactly,
    # sign crossings, NaN/inf, -0.0 and doubles past 2**53 ULPs apart included
    real = torch.float32 if dtype.is_complex else dtype
    info = torch.finfo(real)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny, -info.tiny],
                           dtype=torch.float64).to(real)
    gen = torch.Generator().manual_seed(3)
    for trial in range(40):
        a = torch.randn(30, generator=gen, dtype=torch.float64).to(real)
        b = a.clone()
        pick = torch.randint(0, 30, (5,), generator=gen)
        b[pick] = special[torch.randint(0, len(special), (5,), generator=gen)]
        if trial % 3 == 0:
            b = -b
        if dtype.is_complex:
            a, b = torch.complex(a, b), torch.complex(b, a)
        want = compare(a, b)
        assert max_ulp(a, b) == (0 if want is None or want.max_ulp is None else want.max_ulp)
    assert max_ulp(torch.zeros(2), torch.zeros(3)) is None
    assert max_ulp(torch.zeros(2), torch.zeros(2, dtype=torch.float64)) is None


def test_device_is_part_of_the_contract():
    # e.g. torch's capturable/fused paths keep `step` on the parameter's device: a candidate that
    # keeps it on the CPU differs in layout, whatever the values
    from optparity.harness.bitwise import across_devices

    a = torch.zeros(3)
    meta = torch.empty(3, device="meta")
    diff = compare(meta, a)
    assert diff is not None and diff.reason == "device" and not diff.numeric
    assert "device differs" in diff.describe()
    with across_devices():  # a case across devices: placement is not compared, values are
        assert compare(a.clone(), a) is None
