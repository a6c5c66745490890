"""`optparity report --compare BASE NEW`: per-benchmark ratios and a regression verdict.

BASE and NEW may each be a bench run directory, its samples.csv / memory.csv, or an asv result
JSON (.asv/results/<machine>/<commit>-<env>.json). Every benchmark is reduced to median and
quartiles; larger is worse for all of them (seconds, bytes).

A benchmark regressed when both hold:
  new median / base median > threshold    (slower by more than the allowed factor), and
  new q1 > base q3                        (the two interquartile ranges do not overlap: beyond noise).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd

from optparity.bench.report import (
    MEMORY_CSV,
    SAMPLES_CSV,
    ReportError,
    load_memory,
    load_samples,
)

MEMORY_METRICS = ("state_bytes", "step_peak_bytes")
REFERENCE_PREFIX = "copy_/"  # the machine's streaming copy: reported, never a regression of ours
COLUMNS = ["median", "q1", "q3", "n", "unit"]


def _stats(frame: pd.DataFrame, key: str, value: str, unit: str) -> pd.DataFrame:
    g = frame.groupby(key, sort=False)[value]
    out = pd.DataFrame({"median": g.median(), "q1": g.quantile(0.25), "q3": g.quantile(0.75), "n": g.size()})
    out["unit"] = unit
    out.index.name = "benchmark"
    return out


def _from_samples(path: Path) -> pd.DataFrame:
    return _stats(load_samples(path), "benchmark", "seconds", "s")


def _from_memory(path: Path) -> pd.DataFrame:
    mem = load_memory(path)
    mem = mem[mem["metric"].isin(MEMORY_METRICS)]
    mem = mem.assign(key=mem["benchmark"] + " [" + mem["metric"] + "]")
    return _stats(mem, "key", "bytes", "bytes")


def _from_asv(path: Path) -> pd.DataFrame:
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


def load(path: str | Path) -> pd.DataFrame:
    """Median, quartiles, sample count and unit per benchmark, from any supported result."""
    p = Path(path)
    if not p.exists():
        raise ReportError(f"{p}: no such file or directory")
    if p.is_dir():
        if not (p / SAMPLES_CSV).exists():
            raise ReportError(f"{p}: no {SAMPLES_CSV} in this directory (not a bench run, or it was interrupted)")
        frames = [_from_samples(p / SAMPLES_CSV)]
        if (p / MEMORY_CSV).exists():
            frames.append(_from_memory(p / MEMORY_CSV))
        return pd.concat(frames)
    if p.suffix == ".json":
        return _from_asv(p)
    if p.suffix == ".csv":
        try:
            header = pd.read_csv(p, nrows=0).columns
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            header = pd.Index([])  # load_samples names the problem
        if "metric" in header and "seconds" not in header:
            return _from_memory(p)
        return _from_samples(p)
    raise ReportError(f"{p}: expected a bench run directory, its {SAMPLES_CSV} or {MEMORY_CSV}, "
                      "or an asv result .json")


def compare(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row per benchmark with both sides' medians and IQRs, the ratio and a status."""
    if threshold <= 1.0:
        raise ReportError(f"--threshold must be greater than 1.0 (a slowdown factor), got {threshold}")
    j = base.merge(new, left_index=True, right_index=True, how="outer", suffixes=("_base", "_new"))
    both_zero = (j["median_base"] == 0) & (j["median_new"] == 0)
    j["ratio"] = (j["median_new"] / j["median_base"]).where(~both_zero, 1.0)
    have_base, have_new = j["median_base"].notna(), j["median_new"].notna()
    slower = (j["ratio"] > threshold) & (j["q1_new"] > j["q3_base"])
    faster = (j["ratio"] < 1 / threshold) & (j["q3_new"] < j["q1_base"])
    status = pd.Series("same within noise", index=j.index)
    status[faster] = "faster"
    status[slower] = "SLOWER"
    status[j.index.str.startswith(REFERENCE_PREFIX)] = "machine reference"
    status[have_base & ~have_new] = "missing in NEW"
    status[~have_base & have_new] = "only in NEW"
    status[~have_base & ~have_new] = "skipped in both"
    j["status"] = status
    j["unit"] = j["unit_base"].fillna(j["unit_new"])
    out = pd.DataFrame({
        "unit": j["unit"], "base": j["median_base"], "base_iqr": j["q3_base"] - j["q1_base"],
        "new": j["median_new"], "new_iqr": j["q3_new"] - j["q1_new"], "ratio": j["ratio"], "status": j["status"],
    })
    order = out["status"].map({"SLOWER": 0, "missing in NEW": 1}).fillna(2)
    return out.assign(_o=order).sort_values(["_o", "ratio"], ascending=[True, False]).drop(columns="_o")


def verdict(table: pd.DataFrame, base_name: str, new_name: str, allow_missing: bool) -> int:
    """0 when nothing regressed, 1 when something is SLOWER; ReportError (exit 2) for results
    that cannot be compared."""
    compared = table["status"].isin(["SLOWER", "faster", "same within noise"])
    if not compared.any():
        raise ReportError(f"{base_name} and {new_name} have no benchmark in common")
    missing = table.index[table["status"] == "missing in NEW"]
    if len(missing) and not allow_missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ReportError(f"{new_name}: partial results: {len(missing)} benchmark(s) of {base_name} have no result "
                          f"({shown}); pass --allow-missing to compare the rest")
    return 1 if (table["status"] == "SLOWER").any() else 0


def format_table(table: pd.DataFrame) -> str:
    """The table without the benchmarks neither side ran (asv's skipped combinations)."""
    shown = table[table["status"] != "skipped in both"].reset_index()
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")

