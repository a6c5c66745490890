"""The harness has teeth: every planted bug is caught, and torch.optim against itself is not
flagged (no false alarm)."""
import pytest
import torch

from optparity.harness import check, levels, matrix
from optparity.harness.algorithms import ALGORITHMS
from optparity.harness.mutants import COVER_KINDS, EDGE_MUTANTS, MUTANTS, EdgeMutant
from optparity.harness.params import features

# Edge mutants of a comparison rather than a case condition: caught by what is compared.
COMPARISONS = {"caller_grad", "zero_grad", "hooks", "load_state_dict"}
# Mutants only the default level exposes (they need its float64 or extra parameter-set cases).
NEEDS_DEFAULT_LEVEL = {"lbfgs_complex_grad_imaginary_dropped"}

KINDS = {m.kind for m in MUTANTS}
OPTIONS = {m.shows_under for m in MUTANTS if m.kind == "option"}


def test_catalogue_is_broad():
    assert len(MUTANTS) >= 15
    assert {m.algorithm for m in MUTANTS} == set(ALGORITHMS)
    assert {"numerics", "option", "logic"} <= KINDS
    assert {"maximize", "amsgrad", "nesterov", "dampening", "lr_decay", "centered", "weight_decay"} <= OPTIONS


def test_every_edge_axis_has_teeth():
    assert {m.kind for m in EDGE_MUTANTS} >= set(matrix.EDGE_AXES) | COMPARISONS
    values = {m.shows_under.split(" (")[0] for m in EDGE_MUTANTS if m.kind == "values"}
    assert len(values) >= 5  # NaN, inf, subnormal, -0.0, huge
    # issue 17: degenerate shapes, the AMP recipes, the reload schedule, and interactions (two conditions)
    assert {m.kind for m in EDGE_MUTANTS} >= set(COVER_KINDS)
    assert all(len(m.parts) >= 2 for m in EDGE_MUTANTS if m.kind == "interaction")


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_is_caught(mutant):
    cases = None
    if isinstance(mutant, EdgeMutant):
        # the base matrix is proven not to catch it (below): start where its condition is
        cases = [c for c in levels.select("default", mutant.algorithm) if c.axis != "base" or mutant.exposed(c)]
    for _ in range(5):
        report = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm,
                       fail_fast=True, cases=cases, level=_level_for(mutant))
        first = report.first_failure
        if first is None or "the candidate is 0 ulp from torch's for-loop path" not in first.message:
            break
        # torch is the suspect there (its fused kernel on a gapped view): not the mutant's doing
        pool = cases if cases is not None else levels.select(_level_for(mutant), mutant.algorithm)
        cases = [c for c in pool if c.id != first.case.id]
    assert first is not None, f"{mutant.name} slipped through {len(report.results)} cases"
    assert not report.ok
    assert first.divergence.step >= 1 and first.message
    if mutant.kind == "option":
        assert _option_on(first.case, mutant.shows_under), first.case.id
    if isinstance(mutant, EdgeMutant):
        assert mutant.exposed(first.case), f"caught outside its condition: {first.case.id} {first.message}"
    if mutant.kind in COMPARISONS:
        # parameters and state are torch's: only the new comparison sees the bug
        numeric = first.first_numeric
        assert numeric is None or numeric.where == "grad", first.message


@pytest.mark.parametrize("mutant", [m for m in EDGE_MUTANTS if m.kind not in COMPARISONS], ids=lambda m: m.name)
def test_edge_mutant_hides_without_its_condition(mutant):
    # every case of the suite's level without the condition: float32 base cases and the other edge cases
    cases = [c for c in levels.select(levels.suite_level(), mutant.algorithm)
             if not mutant.exposed(c) and (c.axis != "base" or c.dtype == torch.float32)]
    assert cases
    report = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm, cases=cases)
    assert report.ok, f"{report.first_failure.case.id}: {report.first_failure.message}"


@pytest.mark.parametrize("mutant", [m for m in MUTANTS if m.kind == "option"], ids=lambda m: m.name)
def test_option_mutant_hides_without_its_option(mutant):
    # The point of these mutants: they only show under one option, so the matrix must contain it.
    # the default path where the class takes no foreach flag (Muon, SparseAdam)
    cases = (matrix.build_cases([mutant.algorithm], ("forloop", "foreach"), (torch.float32,), ("mixed",))
             or matrix.build_cases([mutant.algorithm], ("default",), (torch.float32,), ("mixed",)))
    cases = [c for c in cases if c.axis == "base" and not _option_on(c, mutant.shows_under)]
    report = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm, cases=cases)
    assert report.ok, report.first_failure.message


def _level_for(mutant) -> str:
    """The suite's level, or the default level for the few mutants that only its extra cases
    (other dtypes and parameter sets) expose (`optparity selftest` runs every mutant at default)."""
    return "default" if mutant.name in NEEDS_DEFAULT_LEVEL else levels.suite_level()


def _option_on(case, option: str) -> bool:
    """Is `option` switched on anywhere in the case (the second parameter group included)?"""
    two = case.param_set == "groups" or bool({"groups", "added_group"} & features(case.param_set) and
                                               case.param_set.startswith("cover:"))
    groups = [case.config] + ([{**case.config, **case.second_group}] if two else [])
    return any(g.get(option) not in (None, False, 0, 0.0) for g in groups)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_torch_against_itself_is_not_flagged(algo):
    report = check(f"torch.optim:{algo}", f"torch.optim:{algo}", level=levels.suite_level())
    assert report.ok, report.first_failure.message
    assert report.worst_ulp == 0
