"""The regression rule of `optparity report --compare` and `optparity bench --baseline`.

Per benchmark, BASE and NEW each give samples of one normalised figure (one per interleaved
block: optparity / torch's same path, or time / the machine's copy_; see compare.figures). NEW
regressed by more than the minimum effect `delta` when NEW / (1 + delta) is still stochastically
larger than BASE: a one-sided Mann-Whitney U test (scipy, exact for small samples), so an effect
below `delta` can never be called whatever the sample size. The p-values of all benchmarks
compared at once go through Benjamini-Hochberg (false discovery rate `q`).

Verdicts: REGRESSION (significant after the correction), "faster" (the mirror test), "no change".
Re-measurement (compare --remeasure, bench --baseline) measures only the significant benchmarks
again, in a fresh process or at least fresh tensors, and calls a regression only when the fresh
samples, tested on their own, are significant too: the finding must replicate. A suspect whose
re-measurement is not significant is "not confirmed on re-measurement".
The displayed confidence interval of the median ratio is a percentile bootstrap.

Deterministic figures take no test. Memory (allocator records) is exact: any rise is a
regression (compare.compare_memory). Instructions per step (callgrind, instructions.py) are the
same number on every run of one commit whatever the load: a rise beyond the minimum effect is a
REGRESSION outright (count_verdict), no test and no re-measurement; below it "no change", the
same minimum effect as for timings (a change smaller than that is not worth an alarm).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from optparity.bench.thresholds import FDR, MIN_EFFECT

CONFIDENCE = 0.95    # of the displayed bootstrap interval
MIN_SAMPLES = 4      # with fewer samples per side no test can reach significance
BOOTSTRAP_SEED = 19  # the interval is reproducible from the same samples

REGRESSION = "REGRESSION"
REMEASURE = "needs re-measurement"  # no longer given by the rule; tables written before it changed still read
FASTER = "faster"
SAME = "no change"
NOT_CONFIRMED = "not confirmed on re-measurement"
TOO_FEW = "too few samples"
REFERENCE = "reference (torch)"  # torch's own paths: the in-run normalisers, pinned with torch, never tested


@dataclass(frozen=True)
class Rule:
    min_effect: float = MIN_EFFECT
    fdr: float = FDR

    def __post_init__(self):
        if not 0 <= self.min_effect < 1:
            raise ValueError(f"minimum effect must be in [0, 1), got {self.min_effect}")
        if not 0 < self.fdr < 1:
            raise ValueError(f"false discovery rate must be in (0, 1), got {self.fdr}")


def p_slower(base: np.ndarray, new: np.ndarray, min_effect: float) -> float:
    """One-sided p-value of 'NEW is slower than BASE by more than min_effect'."""
    return float(stats.mannwhitneyu(new / (1 + min_effect), base, alternative="greater").pvalue)


def p_faster(base: np.ndarray, new: np.ndarray, min_effect: float) -> float:
    return float(stats.mannwhitneyu(new * (1 + min_effect), base, alternative="less").pvalue)


def bh_reject(pvalues: pd.Series, fdr: float) -> pd.Series:
    """Benjamini-Hochberg: which hypotheses are rejected at false discovery rate fdr."""
    if pvalues.empty:
        return pd.Series(dtype=bool, index=pvalues.index)
    adjusted = stats.false_discovery_control(pvalues.to_numpy(), method="bh")
    return pd.Series(adjusted <= fdr, index=pvalues.index)


def median_ratio_ci(base: np.ndarray, new: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(NEW) / median(BASE), resampling each side."""
    res = stats.bootstrap((new, base), lambda n, b, axis=-1: np.median(n, axis=axis) / np.median(b, axis=axis),
                          n_resamples=1000, method="percentile", confidence_level=confidence, vectorized=True,
                          rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def test_all(samples: dict[str, tuple[np.ndarray, np.ndarray]], rule: Rule) -> pd.DataFrame:
    """One row per benchmark: median ratio NEW/BASE, its bootstrap interval, both p-values and
    whether Benjamini-Hochberg rejects 'no slowdown beyond min_effect' (slower) or the mirror."""
    rows = {}
    for name, (base, new) in samples.items():
        base, new = np.asarray(base, float), np.asarray(new, float)
        row = {"n_base": base.size, "n_new": new.size, "ratio": np.nan, "ci_low": np.nan, "ci_high": np.nan,
               "p_slower": np.nan, "p_faster": np.nan}
        if base.size and new.size:
            row["ratio"] = float(np.median(new) / np.median(base))
        if min(base.size, new.size) >= MIN_SAMPLES:
            row["ci_low"], row["ci_high"] = median_ratio_ci(base, new)
            row["p_slower"] = p_slower(base, new, rule.min_effect)
            row["p_faster"] = p_faster(base, new, rule.min_effect)
        rows[name] = row
    out = pd.DataFrame.from_dict(rows, orient="index",
                                 columns=["n_base", "n_new", "ratio", "ci_low", "ci_high", "p_slower", "p_faster"])
    tested = out["p_slower"].notna()
    out["slower"] = bh_reject(out.loc[tested, "p_slower"], rule.fdr).reindex(out.index, fill_value=False)
    out["faster"] = bh_reject(out.loc[tested, "p_faster"], rule.fdr).reindex(out.index, fill_value=False)
    return out


def first_pass(tested: pd.DataFrame, rule: Rule) -> pd.Series:
    """Verdict from one pass of samples: a significant slowdown is a regression (a suspect, when
    the comparison re-measures); anything else is not. A median beyond min_effect without
    significance is not a suspect: in the first tracker proof, such suspects called on the
    re-measurement alone made 4 of 5 false alarms and none of the 9 detections."""
    verdict = pd.Series(SAME, index=tested.index, dtype=object)
    verdict[tested["faster"]] = FASTER
    verdict[tested["slower"]] = REGRESSION
    verdict[tested["p_slower"].isna()] = TOO_FEW
    return verdict


def suspects(verdict: pd.Series) -> list[str]:
    """What a re-measurement measures again: the first pass's significant slowdowns."""
    return list(verdict.index[verdict.isin([REGRESSION, REMEASURE])])


def second_pass(verdict: pd.Series, retested: pd.DataFrame) -> pd.Series:
    """Final verdict after re-measuring the suspects: replication. A regression only where the
    first pass was significant and the fresh samples, corrected over the re-measured benchmarks
    alone, are significant as well; a suspect that is not re-measured stays unconfirmed."""
    out = verdict.copy()
    for name in suspects(verdict):
        replicated = verdict[name] == REGRESSION and name in retested.index and bool(retested.loc[name, "slower"])
        out[name] = REGRESSION if replicated else NOT_CONFIRMED
    return out


def count_verdict(base: float, new: float, min_effect: float) -> str:
    """A deterministic count (instructions per step): REGRESSION when NEW exceeds BASE by more
    than min_effect, faster when it is below BASE / (1 + min_effect), else no change."""
    if new > base * (1 + min_effect):
        return REGRESSION
    if new * (1 + min_effect) < base:
        return FASTER
    return SAME


def slower_than_reference(ratios: dict[str, np.ndarray], rule: Rule) -> pd.DataFrame:
    """Within one run: is optparity slower than torch's same path by more than min_effect? Each
    sample is the paired ratio of one block; a one-sided Wilcoxon signed-rank test of
    log(ratio) > log(1 + min_effect), Benjamini-Hochberg over the benchmarks."""
    rows = {}
    for name, r in ratios.items():
        r = np.asarray(r, float)
        p = np.nan
        if r.size >= MIN_SAMPLES:
            shifted = np.log(r) - np.log1p(rule.min_effect)
            p = 1.0 if not shifted.any() else float(stats.wilcoxon(shifted, alternative="greater").pvalue)
        rows[name] = {"n": r.size, "ratio": float(np.median(r)) if r.size else np.nan, "p_slower": p}
    out = pd.DataFrame.from_dict(rows, orient="index", columns=["n", "ratio", "p_slower"])
    tested = out["p_slower"].notna()
    # signed ranks test the pseudo-median: a skewed sample can reject with its median below 1 + delta
    out["slower"] = (bh_reject(out.loc[tested, "p_slower"], rule.fdr).reindex(out.index, fill_value=False)
                     & (out["ratio"] > 1 + rule.min_effect))
    return out
