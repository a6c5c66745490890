"""optparity's LBFGS against torch.optim.LBFGS: the same closure calls, losses, parameters and
state (bit for bit, every step, every option), the line-search branches and the stops really
exercised, state dicts that round-trip and cross-load, and bad input refused the same way."""
import copy
import importlib
import warnings

import pytest
import torch

from optparity.harness import check, matrix
from optparity.harness.algorithms import spec
from optparity.harness.mutants import by_name
from optparity.harness.objectives import ClosureObjective
from optparity.harness.params import make_params
from optparity.harness.runner import _compare_value
from optparity.optim import LBFGS

F = importlib.import_module("optparity.functional.lbfgs")  # the package exports the function lbfgs

CONFIGS = spec("LBFGS").configs()
STATE_KEYS = {"func_evals", "n_iter", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad",
              "prev_loss", "al"}


def _run(cls, config, param_set="mixed", dtype=torch.float64, steps=8, seed=3):
    """Per step: (closure calls, returned loss, params, state); and the optimizer."""
    pset = make_params(param_set, dtype, seed, {})
    objective = ClosureObjective(pset)
    opt = cls(pset.params, **copy.deepcopy(config))
    trace = []
    for step in range(1, steps + 1):
        loss = objective.step(opt, step)
        trace.append((objective.step_calls, loss, [p.detach().clone() for p in pset.params],
                      copy.deepcopy(opt.state[pset.params[0]])))
    return trace, opt, pset


def _assert_same_trace(ours, theirs):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert a[0] == b[0], f"step {step}: {a[0]} closure calls, torch {b[0]}"
        for what, x, y in (("loss", a[1], b[1]), ("params", a[2], b[2])):
            diff = _compare_value(x, y)
            assert diff is None, f"step {step} {what}: {diff.describe()}"
        assert set(a[3]) == set(b[3]), f"step {step} state keys"
        for key in b[3]:
            diff = _compare_value(a[3][key], b[3][key])
            assert diff is None, f"step {step} state[{key!r}]: {diff.describe()}"


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.get("line_search_fn") != "backtracking"],
                         ids=matrix.format_config)
def test_closure_calls_losses_params_and_state_match_torch(config):
    ours, _, _ = _run(LBFGS, config)
    theirs, opt, _ = _run(torch.optim.LBFGS, config)
    _assert_same_trace(ours, theirs)
    if config.get("max_iter", 20) > 1:
        assert sum(t[0] for t in theirs) > len(theirs)  # more than one closure call per step somewhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_complex_and_low_precision_match_torch(dtype):
    param_set = "complex" if dtype == torch.float32 else "mixed"
    for config in ({}, {"line_search_fn": "strong_wolfe", "history_size": 3}):
        _assert_same_trace(_run(LBFGS, config, param_set, dtype)[0], _run(torch.optim.LBFGS, config, param_set, dtype)[0])


def test_state_layout_is_torchs():
    trace, opt, pset = _run(LBFGS, {"history_size": 3})
    state = opt.state
    assert list(state) == [pset.params[0]]  # global state, registered on the first param
    s = state[pset.params[0]]
    assert set(s) == STATE_KEYS
    assert len(s["old_dirs"]) == len(s["old_stps"]) == len(s["ro"]) == 3  # wrapped, at history_size
    assert len(s["al"]) == 3 and isinstance(s["prev_loss"], float) and isinstance(s["n_iter"], int)
    assert s["d"].shape == s["prev_flat_grad"].shape == (sum(p.numel() for p in pset.params),)


def _counting(monkeypatch):
    """Count the line search's branches: extrapolations (cubic with bounds), zoom steps (cubic
    without), budgets spent, Wolfe points found while bracketing."""
    seen = {"extrapolate": 0, "zoom": 0, "budget_spent": 0, "wolfe_at_once": 0, "searches": 0}
    cubic, bracket = F.cubic_interpolate, F._find_bracket

    def counted_cubic(*args, bounds=None):
        seen["extrapolate" if bounds is not None else "zoom"] += 1
        return cubic(*args, bounds=bounds)

    def counted_bracket(obj_func, x, t, d, f, g, gtd, c1, c2, max_ls):
        found, done, evals, iters = bracket(obj_func, x, t, d, f, g, gtd, c1, c2, max_ls)
        seen["searches"] += 1
        seen["budget_spent"] += iters == max_ls
        seen["wolfe_at_once"] += done
        return found, done, evals, iters

    monkeypatch.setattr(F, "cubic_interpolate", counted_cubic)
    monkeypatch.setattr(F, "_find_bracket", counted_bracket)
    return seen


def test_strong_wolfe_branches_are_exercised_by_the_matrix_configs(monkeypatch):
    seen = _counting(monkeypatch)
    for config in CONFIGS:
        if config.get("line_search_fn") == "strong_wolfe":
            _run(LBFGS, config, steps=12)
    assert seen["searches"] > 50
    assert all(seen[k] > 0 for k in ("extrapolate", "zoom", "budget_spent", "wolfe_at_once")), seen


def test_tolerance_and_budget_stops_trigger():
    # optimal at the start of a step: one closure call, no iteration
    trace, _, _ = _run(LBFGS, {"tolerance_grad": 0.5, "history_size": 3}, steps=12)
    n_iters = [t[3]["n_iter"] for t in trace]
    assert any(t[0] == 1 and n == prev for t, n, prev in zip(trace[1:], n_iters[1:], n_iters))
    # max_eval caps the closure calls of every step
    trace, _, _ = _run(LBFGS, {"max_iter": 6, "max_eval": 4})
    assert {t[0] for t in trace} == {4}
    # the loss-change tolerance ends steps before max_iter
    trace, _, _ = _run(LBFGS, {"tolerance_change": 1e-4})
    iters = [b[3]["n_iter"] - a[3]["n_iter"] for a, b in zip(trace, trace[1:])]
    assert max(iters) < 20 and min(iters) >= 1


@pytest.mark.parametrize("config", [{}, {"line_search_fn": "strong_wolfe", "history_size": 4}],
                         ids=matrix.format_config)
def test_state_dict_round_trip_and_cross_load(config):
    """Stop after 4 steps, resume from the state dict in a fresh optimizer of either kind: the
    rest of the run is bit-identical to an uninterrupted torch run."""
    straight, _, _ = _run(torch.optim.LBFGS, config, steps=8)
    for first, second in ((LBFGS, LBFGS), (LBFGS, torch.optim.LBFGS), (torch.optim.LBFGS, LBFGS)):
        pset = make_params("mixed", torch.float64, 3, {})
        objective = ClosureObjective(pset)
        opt = first(pset.params, **config)
        for step in range(1, 5):
            objective.step(opt, step)
        saved = opt.state_dict()
        before = copy.deepcopy(saved)
        resumed = second(pset.params, **config)
        resumed.load_state_dict(saved)
        # the caller's dict is left alone
        assert all(_compare_value(saved["state"][0][k], v) is None for k, v in before["state"][0].items())
        for step in range(5, 9):
            calls_before = objective.total_calls
            loss = objective.step(resumed, step)
            ref_calls, ref_loss, ref_params, ref_state = straight[step - 1]
            assert objective.total_calls - calls_before == ref_calls
            assert _compare_value(loss, ref_loss) is None
            assert _compare_value([p.detach() for p in pset.params], ref_params) is None, (first, second, step)
            state = resumed.state[pset.params[0]]
            for key in ref_state:
                assert _compare_value(state[key], ref_state[key]) is None, (first, second, step, key)


# --- bad input: torch's own error inputs for LBFGS, and LBFGS's own refusals

def _outcome(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the exception is the fact compared
            return type(e), str(e), [str(w.message) for w in caught]
    return None, None, [str(w.message) for w in caught]


def _torch_error_inputs():
    common = pytest.importorskip("torch.testing._internal.common_optimizers",
                                 reason="torch's test helpers need expecttest")
    entry = next(e for e in common.optim_db if e.optim_cls is torch.optim.LBFGS)
    return common, entry.optim_error_inputs_func("cpu", torch.float32)


def test_torchs_error_inputs_for_lbfgs_are_refused_the_same_way():
    common, inputs = _torch_error_inputs()
    assert inputs
    for error_input in inputs:
        given = error_input.optimizer_error_input
        kwargs = given.kwargs
        outcomes = []
        for cls in (LBFGS, torch.optim.LBFGS):
            params = given.params if given.params is not None else [torch.nn.Parameter(torch.randn(2, 3))]

            def run():
                opt = cls(params, **kwargs)
                if error_input.error_on == common.OptimizerErrorEnum.STEP_ERROR:
                    opt.step(lambda: torch.tensor(0.0))

            outcomes.append(_outcome(run))
        assert outcomes[0] == outcomes[1], given.desc
        kind, message, caught = outcomes[1]
        if issubclass(error_input.error_type, Warning):
            assert caught, given.desc
        else:
            assert kind is error_input.error_type, given.desc


def _param():
    return torch.nn.Parameter(torch.randn(3))


def _closure_for(p):
    def closure():
        p.grad = None
        loss = (p * p).sum()
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("case", ["negative_lr", "tensor_lr_2", "two_groups", "added_group", "no_closure",
                                  "unknown_line_search", "negative_line_search_budget", "closure_returns_none",
                                  "non_contiguous_grad"])
def test_own_refusals_match_torch(case):
    def run(cls):
        p, q = _param(), _param()
        if case == "negative_lr":
            cls([p], lr=-0.1)
        elif case == "tensor_lr_2":
            cls([p], lr=torch.tensor([0.1, 0.2]))
        elif case == "two_groups":
            cls([{"params": [p]}, {"params": [q], "lr": 0.1}])
        elif case == "added_group":
            opt = cls([p])
            opt.add_param_group({"params": [q]})
            opt.step(_closure_for(p))
        elif case == "no_closure":
            cls([p]).step()
        elif case == "unknown_line_search":
            cls([p], line_search_fn="backtracking").step(_closure_for(p))
        elif case == "negative_line_search_budget":  # torch reads its bracket before it exists
            cls([p], max_eval=0, line_search_fn="strong_wolfe").step(_closure_for(p))
        elif case == "closure_returns_none":
            cls([p]).step(lambda: None)
        elif case == "non_contiguous_grad":
            w = torch.nn.Parameter(torch.randn(2, 3))
            opt = cls([w])

            def closure():
                w.grad = torch.randn(3, 2).t()  # a grad that cannot be viewed flat
                return torch.tensor(1.0)

            opt.step(closure)
        return p.detach().clone()

    ours, theirs = _outcome(lambda: run(LBFGS)), _outcome(lambda: run(torch.optim.LBFGS))
    assert ours == theirs
    assert theirs[0] is not None  # every one of these is refused


def test_signature_defaults_and_max_eval_default_match_torch():
    p = _param()
    for kwargs in ({}, {"max_iter": 7}, {"max_iter": 7, "max_eval": 3}):
        assert LBFGS([p], **kwargs).defaults == torch.optim.LBFGS([p], **kwargs).defaults


# --- the harness drives LBFGS through its closure: the call count alone catches a bug

def test_an_extra_closure_call_is_caught_by_the_call_count_alone():
    cases = [c for c in matrix.build_cases(["LBFGS"], dtypes=(torch.float64,), param_sets=("mixed",))
             if c.config == {"line_search_fn": "strong_wolfe"} and c.axis == "base"]
    report = check(by_name("lbfgs_extra_closure_call").build(), "torch.optim:LBFGS", algorithm="LBFGS", cases=cases)
    first = report.first_failure
    assert first is not None and first.divergence.where == "closure"
    assert "called the closure" in first.message and first.divergence.step == 1
    # parameters and state are untouched by the extra call: nothing numeric differs
    assert all(r.worst_ulp == 0 for r in report.results)


def test_optparity_lbfgs_passes_the_matrix_subset():
    cases = [c for c in matrix.build_cases(["LBFGS"], dtypes=(torch.float32,), param_sets=("mixed", "groups"))
             if c.axis == "base" and c.config_index in (0, 4, 5, 8, 11)]
    report = check("optparity.optim:LBFGS", cases=cases)
    assert report.ok, report.first_failure.message
    assert {r.verdict for r in report.results} <= {"bit_identical", "same_error"}
