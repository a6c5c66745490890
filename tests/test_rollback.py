"""The rollback axis (matrix.ROLLBACKS): a state_dict loaded back into the optimizer that saved it,
after it has trained on. torch.optim replaces the whole state; a candidate that merges is caught
there and only there (tests/test_mutants.py runs edge_adam_rollback_keeps_stale_state over every
other case too)."""
import pytest

from optparity.harness import check, levels, matrix
from optparity.harness.algorithms import ALGORITHMS
from optparity.harness.mutants import by_name


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_has_rollback_cases_at_quick(algo):
    cases = [c for c in levels.select("quick", algo) if c.axis == "rollback"]
    assert cases and all(c.steps > max(load for _, load in matrix.ROLLBACKS) for c in cases)


def test_stale_state_is_caught_where_the_rollback_loads():
    cases = [c for c in levels.select("quick", "Adam") if c.axis == "rollback"]
    report = check(by_name("edge_adam_rollback_keeps_stale_state").build(), "torch.optim:Adam",
                   algorithm="Adam", cases=cases[:1])
    first = report.first_failure
    assert not report.ok and first.first_api is not None
    # the checkpoint of step 0 has no state: after loading it at step 5 only the mutant has some
    assert first.first_api.step == matrix.ROLLBACKS[0][1], first.message
    assert "only the candidate has state" in first.first_api.message


def test_optparity_adam_rolls_back_as_torch():
    import optparity.optim as oo
    cases = [c for c in levels.select("quick", "Adam") if c.axis == "rollback"]
    report = check(oo.Adam, "torch.optim:Adam", cases=cases)
    assert report.ok and report.worst_ulp == 0
