"""The edge axes of the matrix (issue 8): each builds its condition, the conditions are applied
inside the case, and the new comparisons see what they are meant to see."""
import copy

import pytest
import torch

from optparity.harness import conditions, levels, matrix, observers, params
from optparity.harness.algorithms import SPECS
from optparity.harness.candidates import make_driver
from optparity.harness.runner import Subject, run_case

DENSE = [a for a, s in SPECS.items() if s.kind == "dense"]


def _cheap(algo):
    return [c for c in matrix.edge_cases(algo) if c.cost == "cheap"]


@pytest.mark.parametrize("algo", DENSE)
def test_every_dense_algorithm_gets_every_axis_at_the_default_level(algo):
    axes = {c.axis for c in levels.select("default", algo) if c.axis != "base"}
    expected = set(matrix.EDGE_AXES) - (set() if SPECS[algo].low_precision else {"low_precision"})
    assert axes >= expected  # other axes (schedulers) may come on top
    assert all(c.cost == "cheap" for c in _cheap(algo))


@pytest.mark.parametrize("algo", [a for a, s in SPECS.items() if s.low_precision and s.kind != "closure"])
def test_every_configuration_meets_both_half_types_at_the_default_level(algo):
    cases = [c for c in levels.select("default", algo) if c.axis == "low_precision"]
    for dtype in (torch.bfloat16, torch.float16):
        have = {c.config_index for c in cases if c.dtype == dtype}
        assert have == set(range(len(matrix.configs(algo)))), f"{algo}: configs without {dtype}"
    # and on more than one path: the path rotates with the configuration
    assert len({c.path for c in cases}) == len([p for p in matrix.PATHS if matrix._runs(algo, p, torch.bfloat16)])


def test_edge_ids_are_unique_and_name_their_condition():
    cases = matrix.build_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    for c in cases:
        if c.axis != "base":
            assert f"/{c.axis}" in c.id
        if c.threads > 1:
            assert f"threads={c.threads}" in c.id
        if c.amp:
            assert "GradScaler" in c.id


def test_expensive_cases_only_at_full_level():
    default = levels.select("default", "Adam")
    full = levels.select("full", "Adam")
    assert not [c for c in default if c.cost == "expensive"]
    expensive = [c for c in full if c.cost == "expensive"]
    assert {c.axis for c in expensive} >= {"sizes", "tensor_count", "lengths", "threads", "values", "amp"}
    assert max(c.steps for c in expensive) >= 1000
    assert any(c.param_set == "sizes_full" for c in expensive)


def test_big_conditions_sit_on_a_subset():
    cheap = _cheap("Adam")
    big = [c for c in cheap if c.param_set.startswith(("sizes", "many")) or c.steps > matrix.STEPS]
    assert 0 < len(big) <= 12
    assert {c.path for c in cheap if c.param_set == "many"} == {"foreach", "fused"}


def test_sizes_cross_tails_chunks_and_the_thread_grain():
    ps = params.make_params("sizes", torch.float32, 0, {})
    counts = [p.numel() for p in ps.params]
    assert {n % 8 for n in counts} >= set(range(1, 8))
    assert {n % 16 for n in counts} >= {1, 3, 7, 9, 15}
    assert max(counts) > 2 * params.CHUNK and max(counts) >= 2 * params.GRAIN
    assert all(n > params.SMALL for n in counts)


def test_other_edge_sets_keep_small_tensors():
    # so that tail-after-a-full-vector conditions belong to the sizes axis alone
    for name in ("many", "layouts", "values", "dtype_mix"):
        ps = params.make_params(name, torch.float32, 0, {})
        assert max(p.numel() for p in ps.params) <= params.SMALL, name


def test_many_tensors_in_one_group():
    ps = params.make_params("many", torch.float32, 0, {})
    assert len(ps.groups) == 1 and len(ps.groups[0][0]) > 110


def test_layouts():
    ps = params.make_params("layouts", torch.float32, 0, {})
    grads = params.make_grads(ps, 0, 1)
    by_name = dict(zip(ps.names, zip(ps.params, grads)))
    p, g = by_name["channels_last"]
    assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    assert g.stride() == p.stride()
    p, g = by_name["transposed_grad_contiguous"]
    assert not p.is_contiguous() and g.is_contiguous() and g.stride() != p.stride()
    p, g = by_name["contiguous_grad_transposed"]
    assert p.is_contiguous() and g.stride() != p.stride()
    assert not by_name["gapped_3d"][0].is_contiguous()
    assert by_name["storage_offset"][0].storage_offset() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_values_hold_every_special_value(dtype):
    ps = params.make_params("values", dtype, 0, {})
    grads = torch.cat([g.double().flatten() for s in range(1, 7) for g in params.make_grads(ps, 0, s)])
    tiny = torch.finfo(dtype).tiny
    assert grads.isnan().any() and (grads == float("inf")).any() and (grads == float("-inf")).any()
    assert ((grads != 0) & (grads.abs() < tiny)).any()
    assert ((grads == 0) & torch.signbit(grads)).any() and ((grads == 0) & ~torch.signbit(grads)).any()
    assert (grads.isfinite() & (grads.abs() > torch.finfo(dtype).max ** 0.5)).any()
    # and state reaches infinity: huge gradients squared overflow Adam's exp_avg_sq
    opt = torch.optim.Adam(ps.params)
    for p, g in zip(ps.params, params.make_grads(ps, 0, 1)):
        p.grad = g
    opt.step()
    huge = ps.params[ps.names.index("huge_grad")]
    assert opt.state[huge]["exp_avg_sq"].isinf().any()


def test_dtype_mix_group_holds_four_dtypes():
    ps = params.make_params("dtype_mix", torch.float32, 0, {})
    assert len(ps.groups) == 1
    assert {p.dtype for p in ps.params} == {torch.float32, torch.float64, torch.bfloat16, torch.float16}


def test_conditions_are_applied_inside_the_case_and_restored():
    seen = {}

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            seen["threads"], seen["dtype"] = torch.get_num_threads(), torch.get_default_dtype()
            return super().step(closure)

    Recording.__name__ = "SGD"
    before = torch.get_num_threads(), torch.get_default_dtype()
    for extra in ({"threads": 2}, {"default_dtype": torch.float64}):
        case = matrix.Case("SGD", {}, "forloop", torch.float32, "mixed", steps=1, axis="x", **extra)
        run_case(case, Subject.of(Recording), Subject.of("torch.optim:SGD"))
        assert seen["threads"] == extra.get("threads", before[0])
        assert seen["dtype"] == extra.get("default_dtype", before[1])
    assert (torch.get_num_threads(), torch.get_default_dtype()) == before


def test_grad_scaler_grows_backs_off_and_skips():
    case = matrix.Case("Adam", {}, "fused", torch.float32, "mixed", amp=True, axis="amp")
    ps = params.make_params("mixed", torch.float32, 1, {})
    driver = make_driver(torch.optim.Adam, "optimizer", "Adam", ps, {"fused": True})
    scales, skipped = [], []
    for n in range(1, 13):
        before = [p.detach().clone() for p in ps.params]
        conditions.step(case, driver, params.make_grads(ps, 1, n), n)
        scales.append(conditions.scaler_of(driver).get_scale())
        skipped.append(all(torch.equal(b, p) for b, p in zip(before, ps.params)))
    assert any(b < a for a, b in zip(scales, scales[1:])), scales  # backoff after an inf
    assert any(b > a for a, b in zip(scales, scales[1:])), scales  # growth after clean steps
    assert [n for n, s in enumerate(skipped, 1) if s] == list(conditions.AMP_INF_STEPS)


def test_load_state_dict_mutation_is_seen():
    sd = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    before = copy.deepcopy(sd)
    assert observers.changes(sd, before) is None
    sd["state"][0]["step"].add_(1)
    assert "step" in observers.changes(sd, before)
    sd = copy.deepcopy(before)
    sd["param_groups"][0]["lr"] = 0.2
    assert "lr" in observers.changes(sd, before)


def test_grad_comparison_covers_layout_and_none():
    a = torch.zeros(3, 4)
    assert observers.compare_grads(a, a.clone()) == (None, "")
    assert "None" in observers.compare_grads(None, a)[1]
    assert "strides" in observers.compare_grads(a.t().contiguous().t(), a)[1]
    assert observers.compare_grads(a + 1, a)[0] is not None


@pytest.mark.parametrize("algo", ["Adam", "SGD"])
def test_optparity_passes_its_edge_cases(algo):
    cand, ref = Subject.of(f"optparity.optim:{algo}"), Subject.of(f"torch.optim:{algo}")
    cases = [c for c in _cheap(algo) if c.param_set not in ("sizes",) and c.steps <= matrix.STEPS]
    failed = [(c.id, r.message) for c in cases if (r := run_case(c, cand, ref)).status != "pass"]
    assert not failed, failed[:3]


@pytest.mark.parametrize("level", ["quick", "default"])
def test_complex_dtypes_select_the_complex_set(level):
    c64 = levels.select(level, "Adam", dtypes=[torch.complex64])
    assert c64 and all(c.param_set == "complex" and c.dtype == torch.float32 for c in c64)
    c128 = levels.select(level, "Adam", dtypes=[torch.complex128])
    assert c128 and all(c.param_set == "complex" and c.dtype == torch.float64 for c in c128)
    both = levels.select(level, "Adam", dtypes=[torch.float32, torch.complex128])
    assert {c.id for c in c128} <= {c.id for c in both} and any(c.param_set != "complex" for c in both)
    assert levels.select(level, "Muon", dtypes=[torch.complex64]) == []  # Muon takes no complex params
