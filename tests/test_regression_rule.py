"""The regression rule of `optparity report --compare` (optparity.bench.decide) on synthetic
samples: machine-wide slowdowns cancel, planted slowdowns are caught, many comparisons at once
are corrected, and a suspect needs a second, independent pass before it is called."""
import numpy as np
import pandas as pd
import pytest

from optparity.bench import decide
from optparity.bench.report import figures

RULE = decide.Rule()


def samples(rng, n, median=1.0, sigma=0.02):
    return median * rng.lognormal(0, sigma, n)


def test_identical_distributions_are_never_called_over_many_benchmarks():
    rng = np.random.default_rng(0)
    pairs = {f"b{i}": (samples(rng, 24), samples(rng, 24)) for i in range(60)}
    verdict = decide.first_pass(decide.test_all(pairs, RULE), RULE)
    assert (verdict != decide.REGRESSION).all()


def test_shift_below_the_minimum_effect_is_never_significant():
    # 2 % slower with tiny noise: statistically obvious, but below the 3 % floor
    rng = np.random.default_rng(1)
    pairs = {"b": (samples(rng, 50, 1.0, 0.002), samples(rng, 50, 1.02, 0.002))}
    tested = decide.test_all(pairs, RULE)
    assert tested.loc["b", "ratio"] == pytest.approx(1.02, abs=0.003)
    assert not tested.loc["b", "slower"] and decide.first_pass(tested, RULE)["b"] == decide.SAME


def test_planted_5_percent_is_caught_and_only_there():
    rng = np.random.default_rng(2)
    # 48 samples a side: what the first pass (24 blocks) and the re-measurement (48) give together
    pairs = {f"b{i}": (samples(rng, 48), samples(rng, 48)) for i in range(10)}
    pairs["b7"] = (samples(rng, 48), samples(rng, 48, 1.05))
    verdict = decide.first_pass(decide.test_all(pairs, RULE), RULE)
    assert list(verdict.index[verdict == decide.REGRESSION]) == ["b7"]


def test_benjamini_hochberg_needs_a_smaller_p_when_more_benchmarks_are_compared():
    # a p-value of 0.01 is significant alone, not among 10 with nothing else going on
    p = pd.Series([0.01] + [0.9] * 9, index=[f"b{i}" for i in range(10)])
    assert decide.bh_reject(p.iloc[:1], 0.05).all()
    assert not decide.bh_reject(p, 0.05).any()
    # ... but it is when the others are small too (BH's step-up)
    assert decide.bh_reject(pd.Series([0.01, 0.02, 0.03, 0.04]), 0.05).all()


def test_faster_is_not_a_regression():
    rng = np.random.default_rng(3)
    tested = decide.test_all({"b": (samples(rng, 24), samples(rng, 24, 0.8))}, RULE)
    assert decide.first_pass(tested, RULE)["b"] == decide.FASTER


def test_too_few_samples_are_reported_not_tested():
    tested = decide.test_all({"b": (np.ones(2), np.ones(2) * 2)}, RULE)
    assert decide.first_pass(tested, RULE)["b"] == decide.TOO_FEW


def test_a_suspect_is_called_only_when_the_remeasurement_replicates_it():
    rng = np.random.default_rng(4)
    base = samples(rng, 24)
    first = decide.first_pass(decide.test_all({"noise": (base, samples(rng, 24, 1.08)),
                                               "real": (base, samples(rng, 24, 1.06))}, RULE), RULE)
    assert set(decide.suspects(first)) == {"noise", "real"}
    again = decide.test_all({"noise": (base, samples(rng, 72)), "real": (base, samples(rng, 72, 1.06))}, RULE)
    final = decide.second_pass(first, again)
    assert final["noise"] == decide.NOT_CONFIRMED and final["real"] == decide.REGRESSION
    # a suspect left out of the re-measurement is not called on its first pass alone
    assert decide.second_pass(first, again.drop(index="real"))["real"] == decide.NOT_CONFIRMED


def test_a_high_median_without_significance_is_not_a_suspect():
    # the first tracker proof: such suspects, called on a significant re-measurement compared with
    # the same outlying BASE, made 4 of its 5 false alarms. Both passes must be significant.
    rng = np.random.default_rng(7)
    base = samples(rng, 24, 1.0, 0.15)
    new = samples(rng, 24, 1.0, 0.15)
    new *= 1.06 * np.median(base) / np.median(new)  # median 6 % above BASE, spread +-10 %: not significant
    tested = decide.test_all({"wide": (base, new)}, RULE)
    assert tested.loc["wide", "ratio"] > 1 + RULE.min_effect and not tested.loc["wide", "slower"]
    first = decide.first_pass(tested, RULE)
    assert first["wide"] == decide.SAME and decide.suspects(first) == []
    # even a clearly significant re-measurement cannot call it
    again = decide.test_all({"wide": (base, samples(rng, 72, 1.5, 0.02))}, RULE)
    assert again.loc["wide", "slower"]
    assert decide.second_pass(first, again)["wide"] == decide.SAME


def _paired_run(rng, machine=1.0, slow=1.0, blocks=24):
    """Interleaved blocks of one optparity path and torch's, each block sharing a load factor."""
    rows = []
    for b in range(blocks):
        load = machine * rng.lognormal(0, 0.15)
        for impl, med in (("optparity-foreach", 2e-3 * slow), ("torch-foreach", 2e-3)):
            rows.append({"benchmark": f"Adam/{impl}/1M/float32", "algorithm": "Adam", "impl": impl,
                         "library": impl.split("-")[0], "path": "foreach", "workload": "1M", "dtype": "float32",
                         "block": b, "round": 0, "pass": 0, "seconds": med * load * rng.lognormal(0, 0.02),
                         "copy_seconds": 3e-3 * load * rng.lognormal(0, 0.02)})
    return figures(pd.DataFrame(rows), clock="wall")


def test_machine_wide_slowdown_cancels_in_the_normalised_figures():
    rng = np.random.default_rng(5)
    base, slower_machine = _paired_run(rng), _paired_run(rng, machine=1.125)
    pairs = {}
    for name in base["benchmark"].unique():
        pairs[name] = tuple(r.loc[r["benchmark"] == name, "figure"].to_numpy() for r in (base, slower_machine))
    raw = {name: tuple(r.loc[r["benchmark"] == name, "seconds"].to_numpy() for r in (base, slower_machine))
           for name in base["benchmark"].unique()}
    assert (decide.first_pass(decide.test_all(pairs, RULE), RULE) == decide.SAME).all()
    # the same data in raw seconds: the machine's 12.5 % shows up as a slowdown of everything
    assert decide.test_all(raw, RULE)["ratio"].min() > 1.05


def test_within_run_reference_test():
    rng = np.random.default_rng(6)
    out = decide.slower_than_reference({"same": samples(rng, 24), "slow": samples(rng, 24, 1.10)}, RULE)
    assert not out.loc["same", "slower"] and out.loc["slow", "slower"]


def test_rule_rejects_nonsense():
    with pytest.raises(ValueError, match="minimum effect"):
        decide.Rule(min_effect=-0.1)
    with pytest.raises(ValueError, match="false discovery"):
        decide.Rule(fdr=1.5)
