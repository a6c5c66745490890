"""`optparity report --compare BASE NEW`: per-benchmark verdicts that survive a shared machine.

BASE and NEW may each be a bench run directory, its samples.csv / memory.csv, or an asv result
JSON (.asv/results/<machine>/<commit>-<env>.json).

Bench runs: every timing sample is turned into a normalised figure by the in-run references
measured next to it (blocks.py): optparity's step / torch's step on the same path in the same
block, and for torch's own paths step / the block's copy_. A machine that is slower as a whole
moves both and cancels out; `raw=True` compares seconds instead. The figures are tested with the
rule of decide.py (Mann-Whitney U beyond a minimum effect, Benjamini-Hochberg over all timings,
re-measurement of the suspects). Memory is exact (allocator records): a memory figure regressed
when every NEW sample exceeds every BASE sample, and the difference is reported in bytes.

asv results hold no samples, only quantiles: they keep the quantile rule (NEW/BASE median above
`threshold` and the interquartile ranges apart). See docs/regression-tracking.md.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from optparity.bench import decide
from optparity.bench.report import (
    MEMORY_CSV,
    REFERENCE_PREFIX,
    SAMPLES_CSV,
    ReportError,
    figures,
    load_memory,
    load_samples,
)

MEMORY_METRICS = ("state_bytes", "step_peak_bytes", "step_alloc_bytes", "instructions_per_step")
COUNTED = "instructions_per_step"  # instructions.py: deterministic, a rise beyond the minimum effect regresses
INSTRUCTIONS = "instructions"      # the kind of its rows
COLUMNS = ["median", "q1", "q3", "n", "unit"]


@dataclass
class Result:
    """What one side of a comparison holds: samples (bench runs) or only quantiles (asv)."""
    name: str
    samples: pd.DataFrame | None = None   # one row per timing sample, with the figure columns
    memory: pd.DataFrame | None = None
    stats: pd.DataFrame | None = None     # asv: median, q1, q3, n, unit per benchmark
    run_dir: Path | None = None
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- loading

def _asv_stats(path: Path) -> pd.DataFrame:
    """asv's own loader reads the file; each parameter combination becomes one benchmark."""
    from asv.results import Results
    from asv.util import UserError

    try:
        res = Results.load(str(path))
        rows = {}
        for name in res.get_all_result_keys():
            params = res.get_result_params(name)
            values = res.get_result_value(name, params)
            stats = res.get_result_stats(name, params)
            if params:
                keys = [f"{name}({', '.join(combo)})" for combo in itertools.product(*params)]
            else:
                keys, values, stats = [name], [values], [stats]
            if len(values) != len(keys) or (stats is not None and len(stats) != len(keys)):
                raise ReportError(f"{path}: {name}: {len(values)} results for {len(keys)} parameter combinations")
            method = name.split(".")[-1]
            unit = ("s" if method.startswith("time_") else
                    "bytes" if method.startswith("peakmem_") or "bytes" in method or "memory" in method else "value")
            for key, value, st in zip(keys, values, stats or [None] * len(keys)):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    rows[key] = {"median": math.nan, "q1": math.nan, "q3": math.nan, "n": 0, "unit": unit}
                    continue  # failed or skipped: resolved when compared with the other side
                st = st or {}
                rows[key] = {"median": float(value), "q1": float(st.get("q_25", value)),
                             "q3": float(st.get("q_75", value)), "n": int(st.get("repeat", 1) or 1), "unit": unit}
    except UserError as e:
        raise ReportError(f"{path}: not a readable asv result file ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ReportError(f"{path}: malformed asv result file ({type(e).__name__}: {e})") from None
    if not rows:
        raise ReportError(f"{path}: asv result file holds no benchmark results")
    out = pd.DataFrame.from_dict(rows, orient="index", columns=COLUMNS)
    out.index.name = "benchmark"
    return out


def _memory_of(path: Path) -> pd.DataFrame:
    mem = load_memory(path)
    return mem[mem["metric"].isin(MEMORY_METRICS)]


def load(path: str | Path, clock: str = "cpu") -> Result:
    """A bench run directory, its samples.csv or memory.csv, or an asv result JSON; timings are
    compared on `clock` (report.figures)."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such file or directory")
    if p.is_dir():
        if not (p / SAMPLES_CSV).exists():
            raise ReportError(f"{p}: no {SAMPLES_CSV} in this directory (not a bench run, or it was interrupted)")
        from optparity.bench.report import load_run

        samples, memory, meta = load_run(p)
        mem = memory[memory["metric"].isin(MEMORY_METRICS)] if memory is not None else None
        return Result(str(path), samples=figures(samples, clock), memory=mem, run_dir=p, meta=meta)
    if p.suffix == ".json":
        return Result(str(path), stats=_asv_stats(p))
    if p.suffix == ".csv":
        try:
            header = pd.read_csv(p, nrows=0).columns
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            header = pd.Index([])  # load_samples names the problem
        if "metric" in header and "seconds" not in header:
            return Result(str(path), memory=_memory_of(p))
        return Result(str(path), samples=figures(load_samples(p), clock))
    raise ReportError(f"{p}: expected a bench run directory, its {SAMPLES_CSV} or {MEMORY_CSV}, "
                      "or an asv result .json")


# ---------------------------------------------------------------- comparing

def _timing_samples(res: Result, column: str, passes: str) -> dict[str, np.ndarray]:
    """Samples per benchmark: the first pass, or each benchmark's latest re-measurement."""
    s = res.samples
    if s is None:
        return {}
    if passes == "first":
        s = s[s["pass"] == 0]
    else:
        s = s[s["pass"] > 0]
        s = s[s["pass"] == s.groupby("benchmark")["pass"].transform("max")]
    s = s[~s["benchmark"].str.startswith(REFERENCE_PREFIX) & s[column].notna()]
    return {k: g.to_numpy() for k, g in s.groupby("benchmark", sort=False)[column]}


def _figure_names(res: Result) -> dict[str, str]:
    s = res.samples
    return {} if s is None else s.drop_duplicates("benchmark").set_index("benchmark")["figure_name"].to_dict()


def compare_timings(base: Result, new: Result, rule: decide.Rule, raw: bool = False,
                    second_pass: bool = True) -> pd.DataFrame:
    """The two-pass rule on every timing both runs have (decide.py); second_pass=False gives the
    verdict of NEW's first pass alone, ignoring its re-measurements."""
    column = "time" if raw else "figure"
    b, n = _timing_samples(base, column, "first"), _timing_samples(new, column, "first")
    libraries = {} if new.samples is None else new.samples.drop_duplicates("benchmark").set_index("benchmark")["library"]
    references = [k for k in b if k in n and libraries.get(k) == "torch"]
    common = [k for k in b if k in n and k not in references]
    tested = decide.test_all({k: (b[k], n[k]) for k in common}, rule)
    verdict = decide.first_pass(tested, rule)
    again = _timing_samples(new, column, "latest") if second_pass else {}
    suspects = [k for k in decide.suspects(verdict) if k in again]
    remeasured = pd.Series(False, index=tested.index)
    tested["ratio_again"] = tested["p_again"] = np.nan
    if suspects:
        retested = decide.test_all({k: (b[k], again[k]) for k in suspects}, rule)
        final = decide.second_pass(verdict[suspects], retested)
        verdict[suspects] = final
        remeasured[suspects] = True
        tested.loc[suspects, ["ratio_again", "p_again"]] = retested[["ratio", "p_slower"]].to_numpy()
    names = _figure_names(new)
    out = tested.assign(kind="time", figure=[("seconds" if raw else names.get(k, "")) for k in tested.index],
                        base=[float(np.median(b[k])) for k in tested.index],
                        new=[float(np.median(n[k])) for k in tested.index],
                        remeasured=remeasured, verdict=verdict)
    ref = pd.DataFrame({"kind": "time", "figure": [("seconds" if raw else names.get(k, "")) for k in references],
                        "base": [float(np.median(b[k])) for k in references],
                        "new": [float(np.median(n[k])) for k in references],
                        "ratio": [float(np.median(n[k]) / np.median(b[k])) for k in references],
                        "verdict": decide.REFERENCE}, index=references)
    missing = [k for k in b if k not in n]
    extra = [k for k in n if k not in b]
    rest = pd.DataFrame({"kind": "time", "verdict": ["missing in NEW"] * len(missing) + ["only in NEW"] * len(extra)},
                        index=missing + extra)
    return pd.concat([t for t in (out, ref, rest) if len(t)])


def compare_memory(base: Result, new: Result, rule: decide.Rule = decide.Rule()) -> pd.DataFrame:
    """Exact figures: REGRESSION when NEW's smallest sample exceeds BASE's largest. Instruction
    counts (kind "instructions"): when NEW exceeds BASE by more than the minimum effect."""
    if base.memory is None or new.memory is None:
        return pd.DataFrame()
    key = lambda m: m["benchmark"] + " [" + m["metric"] + "]"  # noqa: E731
    bm = base.memory.assign(key=key(base.memory)).groupby("key")["bytes"].agg(["min", "max", "median"])
    nm = new.memory.assign(key=key(new.memory)).groupby("key")["bytes"].agg(["min", "max", "median"])
    j = bm.merge(nm, left_index=True, right_index=True, how="inner", suffixes=("_b", "_n"))
    verdict = pd.Series(decide.SAME, index=j.index, dtype=object)
    verdict[j["max_n"] < j["min_b"]] = decide.FASTER
    verdict[j["min_n"] > j["max_b"]] = decide.REGRESSION
    both_zero = (j["median_b"] == 0) & (j["median_n"] == 0)
    ratio = (j["median_n"] / j["median_b"].where(j["median_b"] != 0)).where(~both_zero, 1.0)
    counted = j.index.str.endswith(f"[{COUNTED}]")
    for k in j.index[counted]:  # one deterministic count per run: no test (decide.count_verdict)
        verdict[k] = decide.count_verdict(j.loc[k, "median_b"], j.loc[k, "median_n"], rule.min_effect)
    out = pd.DataFrame({"kind": np.where(counted, INSTRUCTIONS, "memory"),
                        "figure": np.where(counted, "instructions per step (callgrind)", "bytes (exact)"),
                        "base": j["median_b"], "new": j["median_n"], "ratio": ratio,
                        "delta_bytes": (j["median_n"] - j["median_b"]).where(~counted), "verdict": verdict})
    missing = bm.index.difference(nm.index)
    if len(missing):
        out = pd.concat([out, pd.DataFrame({"kind": "memory", "verdict": "missing in NEW"}, index=missing)])
    return out


def compare_quantiles(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """asv results (no samples): slower when the median ratio exceeds threshold and NEW's q1 lies
    above BASE's q3 (the interquartile ranges do not overlap)."""
    j = base.merge(new, left_index=True, right_index=True, how="outer", suffixes=("_base", "_new"))
    both_zero = (j["median_base"] == 0) & (j["median_new"] == 0)
    ratio = (j["median_new"] / j["median_base"]).where(~both_zero, 1.0)
    have_base, have_new = j["median_base"].notna(), j["median_new"].notna()
    verdict = pd.Series(decide.SAME, index=j.index, dtype=object)
    verdict[(ratio < 1 / threshold) & (j["q3_new"] < j["q1_base"])] = decide.FASTER
    verdict[(ratio > threshold) & (j["q1_new"] > j["q3_base"])] = decide.REGRESSION
    verdict[have_base & ~have_new] = "missing in NEW"
    verdict[~have_base & have_new] = "only in NEW"
    verdict[~have_base & ~have_new] = "skipped in both"
    unit = j["unit_base"].fillna(j["unit_new"])
    return pd.DataFrame({"kind": np.where(unit == "s", "time", np.where(unit == "bytes", "memory", "value")),
                         "figure": unit, "base": j["median_base"], "new": j["median_new"], "ratio": ratio,
                         "base_iqr": j["q3_base"] - j["q1_base"], "new_iqr": j["q3_new"] - j["q1_new"],
                         "verdict": verdict})


def machine_ratio(base: Result, new: Result) -> float:
    """NEW's copy_ time over BASE's (medians): how much slower the machine was as a whole."""
    if base.samples is None or new.samples is None:
        return math.nan
    med = [r.samples.loc[r.samples["benchmark"].str.startswith(REFERENCE_PREFIX) & (r.samples["pass"] == 0),
                         "time"].median() for r in (base, new)]
    return float(med[1] / med[0]) if med[0] else math.nan


def compare(base: Result, new: Result, rule: decide.Rule, raw: bool = False, threshold: float = 1.10,
            second_pass: bool = True) -> pd.DataFrame:
    """One row per benchmark and figure: kind (time/memory), medians, ratio, interval, p-values,
    verdict. REGRESSION rows first, worst first."""
    if threshold <= 1.0:
        raise ReportError(f"--threshold must be greater than 1.0 (a slowdown factor), got {threshold}")
    if (base.stats is None) != (new.stats is None):
        a, b = (base, new) if base.stats is not None else (new, base)
        raise ReportError(f"{a.name} is an asv result and {b.name} a bench run: they have no benchmark in common")
    if base.stats is not None:
        table = compare_quantiles(base.stats, new.stats, threshold)
    else:
        parts = [t for t in (compare_timings(base, new, rule, raw, second_pass), compare_memory(base, new, rule)) if len(t)]
        table = pd.concat(parts) if parts else pd.DataFrame(columns=["kind", "verdict"])
    table.index.name = "benchmark"
    order = table["verdict"].map({decide.REGRESSION: 0, "missing in NEW": 1, decide.REMEASURE: 2,
                                  decide.NOT_CONFIRMED: 3}).fillna(4)
    return table.assign(_o=order).sort_values(["_o", "ratio"], ascending=[True, False]).drop(columns="_o")


COMPARED = (decide.REGRESSION, decide.FASTER, decide.SAME, decide.REMEASURE, decide.NOT_CONFIRMED, decide.TOO_FEW,
            decide.REFERENCE)


def verdict(table: pd.DataFrame, base_name: str, new_name: str, allow_missing: bool) -> int:
    """0 when nothing regressed, 1 when something did; ReportError (exit 2) for results that
    cannot be compared."""
    if not table["verdict"].isin(COMPARED).any():
        raise ReportError(f"{base_name} and {new_name} have no benchmark in common")
    missing = table.index[table["verdict"] == "missing in NEW"]
    if len(missing) and not allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ReportError(f"{new_name}: partial results: {len(missing)} benchmark(s) of {base_name} have no result "
                          f"({shown}); pass --allow-missing to compare the rest")
    return 1 if (table["verdict"] == decide.REGRESSION).any() else 0


def counts(table: pd.DataFrame) -> str:
    """The verdict counts, then per kind of figure (timings, memory, instructions) when several."""
    def line(t: pd.DataFrame) -> str:
        c = t["verdict"].value_counts()
        return ", ".join(f"{int(c[v])} {v}" for v in (decide.REGRESSION, decide.REMEASURE, decide.NOT_CONFIRMED,
                                                       decide.FASTER, decide.SAME, decide.TOO_FEW, decide.REFERENCE)
                         if v in c)

    kinds = [k for k in ("time", "memory", INSTRUCTIONS) if (table["kind"] == k).any()]
    text = line(table)
    if len(kinds) > 1:
        text += " (" + "; ".join(f"{k}: {line(table[table['kind'] == k])}" for k in kinds) + ")"
    return text


def _fmt_bytes(n: float) -> str:
    sign = "+" if n >= 0 else "-"
    n = abs(n)
    return f"{sign}{n / 2**20:.2f} MiB" if n >= 2**20 else f"{sign}{n:,.0f} bytes"


def describe(name: str, row: pd.Series, rule: decide.Rule, n_tested: int) -> str:
    """One benchmark's finding in words."""
    if row["kind"] == "memory" and "delta_bytes" in row and pd.notna(row.get("delta_bytes")):
        return f"{name}: {_fmt_bytes(row['delta_bytes'])} ({row['ratio']:.3f}x; exact allocator accounting)"
    if row["kind"] == INSTRUCTIONS:
        return (f"{name}: {row['ratio']:.3f}x instructions per step ({row['base']:,.0f} -> {row['new']:,.0f}; "
                f"deterministic callgrind count, more than {rule.min_effect:.0%} above BASE)")
    text = f"{name}: {row['ratio']:.3f}x"
    if pd.notna(row.get("ci_low")):
        text += f" (95% CI {row['ci_low']:.3f}-{row['ci_high']:.3f}"
        if pd.notna(row.get("p_slower")):
            text += f", p={row['p_slower']:.2g} for > {1 + rule.min_effect:.2f}x, BH over {n_tested}"
        text += ")"
    if row.get("remeasured"):
        text += f"; re-measured: {row['ratio_again']:.3f}x, p={row['p_again']:.2g}"
    if row.get("figure"):
        text += f" [{row['figure']}]"
    return text


def headline(table: pd.DataFrame, rule: decide.Rule, machine: float = math.nan, shown: int = 3) -> str:
    """The one sentence a person reads first."""
    n_tested = int(((table["kind"] == "time") & table["verdict"].isin(COMPARED)
                    & (table["verdict"] != decide.REFERENCE)).sum())
    bad = table[table["verdict"] == decide.REGRESSION]
    machine_note = (f" The machine as a whole ran {machine:.2f}x the base's copy_ time; normalised figures "
                    "discount it." if not math.isnan(machine) else "")
    if len(bad):
        items = "; ".join(describe(k, r, rule, n_tested) for k, r in bad.head(shown).iterrows())
        more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
        return f"REGRESSION in {len(bad)} of {len(table)} figures: {items}{more}.{machine_note}"
    n_memory = int((table["kind"] == "memory").sum())
    n_counted = int((table["kind"] == INSTRUCTIONS).sum())
    text = (f"No regression: {n_tested} timings tested, none slower by more than {rule.min_effect:.0%} at a "
            f"false discovery rate of {rule.fdr:.0%}; {n_memory} exact memory figures, none larger"
            + (f"; {n_counted} instruction counts per step, none more than {rule.min_effect:.0%} higher."
               if n_counted else "."))
    pending = table[table["verdict"] == decide.REMEASURE]
    if len(pending):
        text += (f" {len(pending)} need re-measurement before anything is called (--remeasure): "
                 + "; ".join(describe(k, r, rule, n_tested) for k, r in pending.head(shown).iterrows()) + ".")
    dropped = int((table["verdict"] == decide.NOT_CONFIRMED).sum())
    if dropped:
        text += f" {dropped} suspect(s) not confirmed on re-measurement."
    return text + machine_note


def format_table(table: pd.DataFrame) -> str:
    """The table without the benchmarks neither side ran (asv's skipped combinations)."""
    keep = [c for c in ("kind", "figure", "base", "new", "ratio", "ci_low", "ci_high", "p_slower", "ratio_again",
                        "p_again", "delta_bytes", "base_iqr", "new_iqr", "verdict") if c in table.columns]
    shown = table.loc[table["verdict"] != "skipped in both", keep].dropna(axis=1, how="all").reset_index()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
