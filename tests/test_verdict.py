"""Verdicts a user can act on (issue 7): every case classified, distances readable, options named."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from optparity.harness import matrix
from optparity.harness.check import check
from optparity.harness.html import write_html
from optparity.harness.mutants import by_name
from optparity.harness.report import counts, format_text, write_json, write_junit
from optparity.harness.runner import DIFFERENT_MATH, ROUNDING, CaseResult, Verdict, _Tracker, report_ok
from optparity.harness.bitwise import compare


def cases(algo="Adam", paths=("forloop",), dtypes=(torch.float32,), param_sets=("mixed",), configs=None, steps=6):
    got = matrix.build_cases([algo], paths, dtypes, param_sets, steps)
    # the base matrix only: edge-condition axes (harness/conditions.py) are tested elsewhere
    return [c for c in got if getattr(c, "axis", None) in (None, "base")
            and (configs is None or c.config_index in configs)]


class ExtraKeyAdam(torch.optim.Adam):
    """torch's numbers, one more param-group key."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group.setdefault("schedule", "none")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self.param_groups[-1].setdefault("schedule", "none")


class NoFusedAdam(torch.optim.Adam):
    """torch's numbers, no `fused` in the signature."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False,
                 decoupled_weight_decay=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, decoupled_weight_decay=decoupled_weight_decay)


class KwargsRejectsFused(torch.optim.Adam):
    def __init__(self, params, **kwargs):
        if "fused" in kwargs:
            raise TypeError("KwargsRejectsFused.__init__() got an unexpected keyword argument 'fused'")
        super().__init__(params, **kwargs)


def test_extra_param_group_key_is_api_only_and_passes_numerics_only():
    report = check(ExtraKeyAdam, "torch.optim:Adam", cases=cases(configs=[0, 1]))
    assert {r.verdict for r in report.results} == {Verdict.API_DIFFERS} and not report.ok
    first = report.first_failure
    assert "key 'schedule' only in the candidate" in first.message and first.first_numeric is None
    assert first.worst_ulp == 0 and "API/layout differs only" in format_text(report)
    relaxed = check(ExtraKeyAdam, "torch.optim:Adam", cases=cases(configs=[0, 1]), numerics_only=True)
    assert relaxed.ok and not relaxed.failed
    assert {r.verdict for r in relaxed.results} == {Verdict.API_DIFFERS}  # still reported
    assert "numerics only" in format_text(relaxed)


def test_missing_fused_is_not_applicable_and_named():
    report = check(NoFusedAdam, "torch.optim:Adam", cases=cases(paths=("forloop", "fused"), configs=[0, 1]))
    fused = [r for r in report.results if r.case.path == "fused"]
    assert fused and all(r.verdict == Verdict.NOT_APPLICABLE and r.rejected_options == ["fused"] for r in fused)
    assert all(r.verdict == Verdict.BIT_IDENTICAL for r in report.results if r.case.path != "fused")
    assert report.ok
    assert f"options the candidate rejected (cases not applicable): fused ({len(fused)})" in format_text(report)


def test_unexpected_keyword_at_construction_is_not_applicable():
    report = check(KwargsRejectsFused, "torch.optim:Adam", cases=cases(paths=("fused", "forloop"), configs=[0]))
    fused = next(r for r in report.results if r.case.path == "fused")
    assert fused.verdict == Verdict.NOT_APPLICABLE and fused.rejected_options == ["fused"]
    assert report.ok


def test_rounding_level_candidate_is_reported_as_such():
    mutant = by_name("adam_lerp_as_mul_add")  # torch's Adam with lerp_ spelled mul_ + add_
    report = check(mutant.build(), "torch.optim:Adam", algorithm="Adam", cases=cases(configs=[0]))
    (r,) = report.results
    assert r.verdict == Verdict.NUMERICS_DIFFER and r.math == ROUNDING
    assert 0 < r.worst_ulp < 1000 and 0 < r.max_rel_error < 1e-4 and r.worst["element"] is not None
    assert len(r.per_step) == r.steps_run and any(row["max_ulp"] for row in r.per_step)
    assert "rounding-level" in r.message and "1 rounding-level" in format_text(report)


def test_different_algorithm_is_different_math_from_step_one():
    report = check("torch.optim:Adamax", "torch.optim:Adam", algorithm="Adam",
                   cases=cases(dtypes=(torch.float64,), configs=[0]))
    (r,) = report.results
    assert r.verdict == Verdict.NUMERICS_DIFFER and r.math == DIFFERENT_MATH
    assert r.first_numeric.step == 1 and r.first_numeric.where == "param"
    assert r.first_api is not None and "state keys differ" in r.first_api.message  # kept apart, not hiding it


def test_same_error_has_its_own_count_and_never_passes_alone():
    capturable = [i for i, c in enumerate(matrix.configs("Adam")) if c.get("capturable")]
    report = check("optparity.optim:Adam", "torch.optim:Adam", cases=cases(configs=capturable))
    assert report.results and all(r.verdict == Verdict.SAME_ERROR for r in report.results)
    assert counts(report.results)[Verdict.SAME_ERROR] == len(report.results)
    assert counts(report.results)[Verdict.BIT_IDENTICAL] == 0
    assert not report.ok  # nothing was shown bit-identical


class RaisesInStep(torch.optim.SGD):
    def step(self, closure=None):
        if self.state.get("calls", 0) >= 2:
            raise RuntimeError("boom")
        self.state["calls"] = self.state.get("calls", 0) + 1
        return super().step(closure)


def test_error_on_one_side_keeps_the_candidates_traceback():
    report = check(RaisesInStep, "torch.optim:SGD", cases=cases("SGD", configs=[0]))
    (r,) = report.results
    assert r.verdict == Verdict.ERROR_ONE_SIDE and r.error.step == 3
    assert "RuntimeError: boom" in r.message and "in step" in r.traceback and "RaisesInStep" not in r.message


class RequiresLr(torch.optim.Adam):
    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr=lr, **kwargs)


def test_required_hyperparameter_is_pinned_with_hyper():
    plain = check(RequiresLr, "torch.optim:Adam", cases=cases(configs=[0]))
    assert plain.results[0].verdict == Verdict.ERROR_ONE_SIDE and "--hyper lr=VALUE" in plain.results[0].message
    pinned = check(RequiresLr, "torch.optim:Adam", cases=cases(configs=[0]), hyper={"lr": 1e-3})
    assert pinned.ok and pinned.results[0].verdict == Verdict.BIT_IDENTICAL


def test_max_ulp_is_an_explicit_tolerance_mode():
    mutant = by_name("adam_lerp_as_mul_add")
    report = check(mutant.build(), "torch.optim:Adam", algorithm="Adam", cases=cases(configs=[0]), max_ulp=10**6)
    assert report.ok and report.results[0].verdict == Verdict.WITHIN_TOLERANCE
    assert "TOLERANCE MODE" in format_text(report)
    strict = check(mutant.build(), "torch.optim:Adam", algorithm="Adam", cases=cases(configs=[0]), max_ulp=0)
    assert not strict.ok


def test_hung_case_fails_and_says_where():
    case = cases(configs=[0])[0]
    hung = CaseResult.hung_in(case, 5, 2.0)
    assert hung.verdict == Verdict.HUNG and hung.status == "fail" and hung.hung_step == 5 and "step 5" in hung.message
    assert not report_ok([hung, CaseResult(case)])


def test_legacy_status_strings_still_construct():
    case = cases(configs=[0])[0]
    assert CaseResult(case, "pass").status == "pass" and CaseResult(case, "skip").status == "skip"
    with pytest.raises(ValueError, match="unknown verdict"):
        CaseResult(case, "maybe")


def test_tracker_sorts_new_kinds_by_whether_they_carry_numbers():
    t = _Tracker()
    t.record(1, "hooks", "p0", None, None, "hook not called")
    t.record(1, "caller_grad", "p0", None, compare(torch.tensor([1.0]), torch.tensor([2.0])))
    assert t.first_api.where == "hooks" and t.first_numeric.where == "caller_grad" and t.worst_ulp > 0


def test_case_filter_substring_and_regex():
    base = cases(configs=[0, 1, 2])
    sub = check("optparity.optim:Adam", cases=base, case_filter="c1[")
    assert [r.case.config_index for r in sub.results] == [1]
    rx = check("optparity.optim:Adam", cases=base, case_filter=r"/c[02]\[")
    assert sorted(r.case.config_index for r in rx.results) == [0, 2]


class Lion(torch.optim.Optimizer):
    """An algorithm torch.optim does not have (sign of an interpolated momentum)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(self._direction(m, g, b1), alpha=-group["lr"])
                m.lerp_(g, 1 - b2)
        return loss

    @staticmethod
    def _direction(m, g, b1):
        return m.lerp(g, 1 - b1).sgn()


class PortedLion(Lion):
    pass


class LionWithoutInterpolation(Lion):
    @staticmethod
    def _direction(m, g, b1):
        return g.sgn()


def test_generic_matrix_for_an_algorithm_torch_lacks():
    report = check(PortedLion, Lion, steps=4, dtypes=[torch.float32])
    configs = {r.case.config_index: r.case.config for r in report.results}
    assert configs[0] == {} and {"lr": 5e-05} in configs.values() and {"maximize": True} in configs.values()
    assert {"weight_decay": 0.01} in configs.values() and {r.case.param_set for r in report.results} == {"mixed", "groups"}
    assert report.ok and all(r.verdict == Verdict.BIT_IDENTICAL for r in report.results)
    buggy = check(LionWithoutInterpolation, Lion, steps=4, dtypes=[torch.float32])
    assert not buggy.ok and buggy.first_failure.verdict == Verdict.NUMERICS_DIFFER


def test_json_junit_and_html_carry_the_verdict(tmp_path):
    mutant = by_name("adam_lerp_as_mul_add")
    report = check(mutant.build(), "torch.optim:Adam", algorithm="Adam", cases=cases(configs=[0, 11]))
    write_json(report, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["counts"][Verdict.NUMERICS_DIFFER] == 1 and doc["counts"][Verdict.SAME_ERROR] == 1
    row = next(r for r in doc["results"] if r["verdict"] == Verdict.NUMERICS_DIFFER)
    assert row["math"] == ROUNDING and row["per_step"] and row["first_numeric_divergence"]["numeric"] is True
    write_junit(report, tmp_path / "r.xml")
    assert 'name="verdict" value="numerics_differ"' in (tmp_path / "r.xml").read_text()
    page = write_html(report, tmp_path / "html")
    text = page.read_text()
    assert "numerics differ" in text and "rounding-level" in text and list((tmp_path / "html").glob("*.png"))


def test_pytest_plugin_marker_turns_cases_into_items(tmp_path):
    (tmp_path / "test_user.py").write_text(textwrap.dedent('''
        import pytest

        @pytest.mark.optparity("optparity.optim:SGD", level="quick", paths=["forloop"],
                               case_filter=r"^SGD/forloop/float32/groups/c[01]\\[[^/]*$")
        def test_sgd(optparity_case):
            optparity_case.assert_ok()
    '''))
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
                          "test_user.py", "-v"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_sgd[SGD/forloop/float32/groups/c0[defaults]] PASSED" in out.stdout
    assert " 2 passed" in out.stdout
