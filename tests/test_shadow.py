"""The shadow verdict (harness/shadow.py): honest reorderings are rounding-level, ignored options
and wrong formulas different math wherever the float64 shadow shows they change the result.

The default run checks each candidate on the for-loop path, the "mixed" parameter set and a few
configurations in every dtype; OPTPARITY_TEST_LEVEL=full runs every configuration and path."""
import os

import pytest
import torch

from optparity.harness import matrix, shadow
from optparity.harness.algorithms import Mutant
from optparity.harness.check import check
from optparity.harness.runner import DIFFERENT_MATH, ROUNDING, Verdict

FULL = os.environ.get("OPTPARITY_TEST_LEVEL") == "full"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The same math in another order: single edits of optparity's kernels (bit-identical to torch's).
REORDERINGS = [
    Mutant("adam_first_moment_mul_add", "Adam", "functional.adam", "m.lerp_(grad, 1 - b1)",
           "m.mul_(b1).add_(grad, alpha=1 - b1)", "numerics"),
    Mutant("nadam_coefficients_reassociated", "NAdam", "functional.nadam",
           "param.addcdiv_(grad, denom, value=(-lr * (1.0 - mu) / (1.0 - mu_product_value)))",
           "param.addcdiv_(grad, denom, value=(-lr * ((1.0 - mu) / (1.0 - mu_product_value))))", "numerics"),
    Mutant("adamax_bias_correction_on_the_moment", "Adamax", "functional.adamax",
           "            scaled_lr = lr / bias_correction\n            param.addcdiv_(m, u, value=-scaled_lr)",
           "            param.addcdiv_(m.div(bias_correction), u, value=-lr)", "numerics"),
    Mutant("rmsprop_square_avg_as_lerp", "RMSprop", "functional.rmsprop",
           "sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)", "sq.lerp_(g * g, 1 - alpha)", "numerics"),
]


def _cases(algo, configs=None, paths=("forloop",), param_sets=("mixed",)):
    out = matrix.build_cases([algo], paths if not FULL else matrix.PATHS, DTYPES,
                             param_sets if not FULL else matrix.PARAM_SETS)
    return [c for c in out if c.axis == "base" and not c.config.get("capturable")
            and (FULL or configs is None or c.config_index in configs)]


def _tensor_lr_configs(algo):
    return [0] + [i for i, c in enumerate(matrix.configs(algo)) if isinstance(c.get("lr"), torch.Tensor)][:1]


def _finite(r) -> bool:
    return not (r.nan_mismatches or r.inf_mismatches)


@pytest.mark.parametrize("mutant", REORDERINGS, ids=lambda m: m.name)
def test_reorderings_are_rounding_level_in_every_dtype(mutant):
    report = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm,
                   cases=_cases(mutant.algorithm, _tensor_lr_configs(mutant.algorithm)))
    differing = [r for r in report.results if r.verdict == Verdict.NUMERICS_DIFFER]
    shown = {r.case.dtype for r in differing}
    assert {torch.float32, torch.float64} <= shown, shown
    if mutant.algorithm in ("Adam", "RMSprop"):  # NAdam's and Adamax's coefficients are Python floats there
        assert shown == set(DTYPES), shown
    wrong = [(r.case.id, r.shadow) for r in differing if _finite(r) and r.math != ROUNDING]
    assert not wrong
    assert all(r.shadow["ratio"] <= shadow.FACTOR and r.shadow["basis"] for r in differing if _finite(r))


def _ignoring(base, **forced):
    class Ignoring(base):
        def __init__(self, params, **kwargs):
            kwargs.update(forced)
            super().__init__(params, **kwargs)

    Ignoring.__name__ = Ignoring.__qualname__ = base.__name__
    return Ignoring


# (candidate that ignores an option, the option as the candidate applies it, config key it ignores)
OMISSIONS = [
    (torch.optim.Adam, {"amsgrad": False}, "amsgrad"),
    (torch.optim.Adam, {"maximize": False}, "maximize"),
    (torch.optim.RMSprop, {"centered": False}, "centered"),
    (torch.optim.Adagrad, {"lr_decay": 0.0}, "lr_decay"),
    (torch.optim.Adam, {"decoupled_weight_decay": False}, "decoupled_weight_decay"),
]


@pytest.mark.parametrize("base,forced,option", OMISSIONS, ids=[o[2] for o in OMISSIONS])
def test_ignored_options_are_different_math_where_the_shadow_sees_them(base, forced, option):
    algo = base.__name__
    configs = [i for i, c in enumerate(matrix.configs(algo)) if c.get(option) and not c.get("capturable")]
    report = check(_ignoring(base, **forced), f"torch.optim:{algo}", algorithm=algo,
                   cases=_cases(algo, configs[:2]))
    seen = set()
    for r in report.results:
        if r.verdict != Verdict.NUMERICS_DIFFER or not _finite(r):
            continue
        effect = shadow.option_effect(r.case, f"torch.optim:{algo}", forced)
        # the candidate's own rounding adds up to about one more FACTOR: twice it is beyond doubt
        if effect > 2 * shadow.FACTOR:
            assert r.math == DIFFERENT_MATH, (r.case.id, effect, r.shadow)
            seen.add(r.case.dtype)
    assert torch.float64 in seen  # float32 too where the option moves it beyond rounding (amsgrad barely does)


def test_missing_bias_correction_is_different_math_in_half_types_too():
    wrong = Mutant("adam_without_bias_correction", "Adam", "functional.adam", "step_size = lr / bc1",
                   "step_size = lr", "logic")
    # lr=0.01 (c1): at the default 1e-3 a half-precision parameter near 1 does not move at all
    report = check(wrong.build(), "torch.optim:Adam", algorithm="Adam", cases=_cases("Adam", [1]))
    assert {r.case.dtype for r in report.results if r.math == DIFFERENT_MATH} == set(DTYPES)
    assert all(r.math == DIFFERENT_MATH for r in report.results if r.verdict == Verdict.NUMERICS_DIFFER and _finite(r))


def test_rmsprop_ignoring_centered_in_half_types():
    """Where centering moves the float64 shadow beyond torch's own half-precision noise, ignoring
    it is different math in float16/bfloat16 too (below that it cannot be told from rounding)."""
    cases = [c for c in _cases("RMSprop", None) if c.dtype in (torch.float16, torch.bfloat16)
             and c.config.get("centered") and not c.config.get("capturable")]
    report = check(_ignoring(torch.optim.RMSprop, centered=False), "torch.optim:RMSprop", cases=cases)
    judged = [r for r in report.results if r.verdict == Verdict.NUMERICS_DIFFER and _finite(r)]
    beyond = [r for r in judged if shadow.option_effect(r.case, "torch.optim:RMSprop", {"centered": False})
              > 2 * shadow.FACTOR]
    assert beyond and all(r.math == DIFFERENT_MATH for r in beyond)


def test_correct_candidate_on_gapped_fused_case_blames_the_reference():
    """torch's fused CPU kernel updates a gapped view as if it were dense: a candidate that does
    the for-loop math there differs from torch, and the case says torch is the suspect. Measured
    until the cross-load (after it the candidate carries torch's fused state), through a rollback
    too: the for-loop path and the shadow follow every reload, zero_grad and rollback."""
    class CorrectFusedAdam(torch.optim.Adam):
        def __init__(self, params, fused=None, **kwargs):
            super().__init__(params, **kwargs)  # the for-loop path's (correct) math for fused=True

    CorrectFusedAdam.__name__ = "Adam"
    cases = [c for c in matrix.build_cases(["Adam"], ("fused",), (torch.float32,), ("mixed",))
             if c.axis in ("base", "rollback") and c.config_index == 0]
    results = check(CorrectFusedAdam, "torch.optim:Adam", cases=cases).results
    assert {r.case.axis for r in results} == {"base", "rollback"}
    for r in results:
        assert r.verdict == Verdict.NUMERICS_DIFFER and "non-dense" in r.reference_suspect, r.case.id
        assert "reference suspect" in r.message and "0 ulp from torch's for-loop path over steps 1-8" in r.message
        assert r.fused_vs_forloop_ulp == 0  # the candidate's math is that path's, bit for bit
        assert r.math == ROUNDING and "for-loop path stands in" in r.shadow["note"], (r.case.id, r.shadow)
