"""Verdicts a user can act on (issue 7): every case classified, distances readable, options named."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


# --- issue 18: layouts, causes, exit reasons, readable figures, small stumbles ---------------------

class KahanAdam(torch.optim.Adam):
    """torch's numbers with another param-group layout (like torch-optimi's): a `kahan_sum` key
    its step needs, and no `amsgrad` one."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["kahan_sum"] = False

    def step(self, closure=None):
        for group in self.param_groups:
            group["kahan_sum"]  # KeyError once torch's state dict (which lacks it) is loaded
        return super().step(closure)

    def state_dict(self):
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.pop("amsgrad", None)
        return sd

    def load_state_dict(self, state_dict):
        for group in state_dict["param_groups"]:
            group.setdefault("amsgrad", False)
        super().load_state_dict(state_dict)


def test_state_dict_layout_difference_is_its_own_finding_and_numbers_go_on():
    report = check(KahanAdam, "torch.optim:Adam", cases=cases(configs=[0, 1], steps=12))
    assert {r.verdict for r in report.results} == {Verdict.API_DIFFERS}, [r.message for r in report.results]
    r = report.results[0]
    assert r.steps_run == r.case.steps and r.first_numeric is None  # compared to the end, numbers identical
    assert "the candidate's state dict lacks 'amsgrad' in param_groups" in r.layout
    assert "the reference's lacks 'kahan_sum' in param_groups" in r.layout
    text = format_text(report)
    assert sum("state-dict layout (2 cases)" in line for line in text.splitlines()) == 1
    assert "numeric verdict: numbers identical 2" in text
    from optparity.harness.report import exit_reason
    assert "--numerics-only" in exit_reason(report)
    assert check(KahanAdam, "torch.optim:Adam", cases=cases(configs=[0, 1], steps=12), numerics_only=True).ok


def test_torch_optimi_adamw_gets_one_layout_line_and_a_numeric_verdict():
    optimi = pytest.importorskip("optimi", reason="torch-optimi is not installed (pip install --no-deps torch-optimi)")
    report = check(optimi.AdamW, "torch.optim:AdamW", cases=cases("AdamW", configs=[0], steps=12), hyper={"lr": 1e-3})
    (r,) = report.results
    assert r.verdict == Verdict.NUMERICS_DIFFER and r.math and r.steps_run == r.case.steps
    assert "'kahan_sum'" in r.layout
    assert sum(line.startswith("state-dict layout") for line in format_text(report).splitlines()) == 1


class AdamIgnoringAmsgradRefusingComplex(torch.optim.Adam):
    def __init__(self, params, amsgrad=False, **kwargs):
        super().__init__(params, **kwargs)

    def step(self, closure=None):
        if any(p.is_complex() for g in self.param_groups for p in g["params"]):
            raise RuntimeError("complex not supported")
        return super().step(closure)


def test_summary_by_cause_names_the_option_and_the_parameter_set():
    from optparity.harness.report import by_config, causes

    got = cases(dtypes=(torch.float64,), param_sets=("mixed", "complex"), configs=[0, 1, 4, 5], steps=12)
    report = check(AdamIgnoringAmsgradRefusingComplex, "torch.optim:Adam", cases=got)
    rows = {(row["outcome"], row["feature"]) for row in causes(report.results)}
    assert ("numerics differ (different math)", "amsgrad=True") in rows, rows
    assert ("error on one side (RuntimeError: complex not supported)", "param_set=complex") in rows, rows
    text = format_text(report)
    assert "by cause" in text and "those with amsgrad=True (2 of its 2)" in text
    table = by_config(report.results)
    assert table.loc["c0[defaults]", "ok"] == 1 and "dominant" in table.columns
    write_json(report, "/dev/null")  # by_cause and by_config are JSON-ready


def test_exit_reason_is_printed_when_every_case_is_the_same_error(capsys):
    from optparity.cli import main

    code = main(["check", "--candidate", "optparity.optim:Adam", "--level", "quick", "--paths", "forloop",
                 "--filter", "capturable=True", "-n", "1", "--timeout", "0", "-q"])
    out = capsys.readouterr().out
    assert code == 1 and "exit 1: no case showed matching numbers (same error on both sides" in out


def test_magnitudes_are_readable_and_exact_in_json():
    from optparity.harness.bitwise import readable_rel, readable_ulp

    assert readable_ulp(2 ** 53) == str(2 ** 53) and readable_ulp(9236452185032772355) == "huge (>2^53)"
    assert readable_rel(0.5) == "0.5" and readable_rel(4.49e304).startswith(">1e+03")
    d = compare(torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([-1e-300, 2.0], dtype=torch.float64))
    assert "huge (>2^53) ulp" in d.describe() and d.max_ulp > 2 ** 53


class LoudError(torch.optim.SGD):
    def step(self, closure=None):
        raise NotImplementedError("no kernel for this backend; registered backends: " + ", ".join(
            f"Backend{i}" for i in range(600)))


def test_long_error_messages_are_short_in_the_summary_and_whole_in_json(tmp_path):
    report = check(LoudError, "torch.optim:SGD", cases=cases("SGD", configs=[0]))
    text = format_text(report)
    assert "whole in --json" in text and max(map(len, text.splitlines())) < 1000
    write_json(report, tmp_path / "r.json")
    assert "Backend599" in json.loads((tmp_path / "r.json").read_text())["results"][0]["message"]


def test_candidate_module_in_the_working_directory_imports_like_python_m(tmp_path):
    (tmp_path / "myopt.py").write_text("import torch\n\nclass MyAdamW(torch.optim.AdamW):\n    pass\n")
    out = subprocess.run([sys.executable, "-m", "optparity", "check", "--candidate", "myopt:MyAdamW", "--level",
                          "quick", "--filter", r"forloop/float32/groups/c0\[", "-n", "1", "--timeout", "0", "-q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "reference: torch.optim:AdamW" in out.stdout and "exit 0" in out.stdout
    # the plugin's command-line form too, from pytest's own script (which does not add the folder)
    pytest_script = Path(sys.executable).parent / "pytest"
    out = subprocess.run([str(pytest_script), "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
                          "--optparity-candidate", "myopt:MyAdamW", "--optparity-level", "quick",
                          "-k", "forloop and float32 and groups and c0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout + out.stderr


def test_subclass_is_recognised_by_its_torch_base():
    from optparity.harness.candidates import algorithm_of

    class MyAdamW(torch.optim.AdamW):
        pass

    class Tuned(MyAdamW):
        pass

    assert algorithm_of(MyAdamW) == "AdamW" and algorithm_of(Tuned) == "AdamW"


def test_hyper_shows_in_case_ids_and_identical_configs_run_once():
    from optparity.harness.check import prepare

    plan = prepare("torch.optim:Adam", level="quick", paths=["forloop"], hyper={"lr": 0.01})
    assert all("lr=0.01" in c.id for c in plan.cases)
    assert len({c.id for c in plan.cases}) == len(plan.cases)
    assert any("makes configuration c1 the same as c0" in note for note in plan.notes)


def test_non_optimizer_callable_is_refused_with_exit_2(capsys):
    from optparity.cli import main

    assert main(["check", "--candidate", "math:sqrt", "--algorithm", "Adam", "-q"]) == 2
    assert "not an optimizer" in capsys.readouterr().err


def test_dtypes_filter_the_edge_cases_too():
    from optparity.harness import levels

    got = levels.select("default", "Adam", dtypes=[torch.float32, torch.float64])
    assert got and all(c.dtype in (torch.float32, torch.float64) for c in got)
    assert not any(c.param_set == "dtype_mix" for c in got)  # its float32 form holds half tensors
    assert any(c.dtype == torch.bfloat16 for c in levels.select("default", "Adam"))


def test_every_summary_column_is_explained_in_help():
    from optparity.cli import build_parser
    from optparity.harness.report import _COLUMNS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["check"].format_help()
    for column in [*_COLUMNS.values(), "worst_ulp", "fused_vs_forloop_ulp", "cases"]:
        assert f"\n  {column}" in text, column
