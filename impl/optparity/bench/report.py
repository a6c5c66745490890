"""Turn a bench run's raw samples into a Markdown summary, matplotlib figures and an HTML page.

Every number is a median with its interquartile range (IQR) next to it, and every figure draws
the IQR as error bars, so the noise of the run is visible wherever a difference is read off.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from optparity.bench import bandwidth, decide  # noqa: E402
from optparity.bench.workloads import DTYPES, IMPLS  # noqa: E402

SAMPLES_CSV = "samples.csv"
MEMORY_CSV = "memory.csv"
META_JSON = "run.json"
SAMPLE_COLUMNS = ("benchmark", "algorithm", "impl", "library", "path", "workload", "dtype", "numel",
                  "n_tensors", "threads", "device", "sample", "seconds", "number_per_run", "bytes_per_step")
BLOCK_COLUMNS = ("cpu_seconds", "copy_seconds", "copy_cpu_seconds", "group", "round", "block", "pass")  # blocks.py
MEMORY_COLUMNS = ("benchmark", "algorithm", "impl", "workload", "dtype", "numel", "metric", "sample", "bytes")
REFERENCE_PREFIX = "copy_/"  # the machine's streaming copy: reported, never a regression of ours
PAIR_KEYS = ["algorithm", "path", "workload", "dtype"]
BLOCK_KEYS = ["round", "block", "pass"]


class ReportError(ValueError):
    """Missing, partial or malformed results; the message names the file and what is wrong."""


def read_csv(path: Path, required: tuple[str, ...], numeric: tuple[str, ...]) -> pd.DataFrame:
    """A results CSV with its required columns present and its numeric columns complete."""
    if not path.is_file():
        raise ReportError(f"{path}: no such file")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ReportError(f"{path}: empty file, no header") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not a readable CSV ({str(e).strip()})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: missing column(s) {', '.join(missing)}")
    if df.empty:
        raise ReportError(f"{path}: header only, no samples (interrupted run?)")
    for col in numeric:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(bad.idxmax())
            what = df.loc[row, "benchmark"] if "benchmark" in df.columns else "?"
            raise ReportError(f"{path}: column {col!r} has {int(bad.sum())} missing or non-numeric value(s), "
                              f"first at data row {row + 1} ({what}): partial or corrupted results")
        df[col] = values
    return df


def load_samples(path: Path) -> pd.DataFrame:
    return read_csv(path, SAMPLE_COLUMNS, ("seconds", "numel", "bytes_per_step"))


def load_memory(path: Path) -> pd.DataFrame:
    return read_csv(path, MEMORY_COLUMNS, ("bytes", "numel"))


CLOCKS = ("cpu", "wall")


def figures(samples: pd.DataFrame, clock: str = "cpu") -> pd.DataFrame:
    """Adds `time` (the clock compared: the process's CPU time per step where recorded, else the
    wall clock; on a GPU both hold CUDA event time), per_copy (time / the copy_ of the same
    block), per_torch (optparity's time / torch's on the same path in the same block) and
    `figure`, the default comparison figure: per_torch where torch's path was measured, else
    per_copy. Runs recorded before interleaving (no block column) are normalised by the run's
    medians instead."""
    if clock not in CLOCKS:
        raise ReportError(f"unknown clock {clock!r}; expected one of {', '.join(CLOCKS)}")
    s = samples.copy()
    for col, default in (("pass", 0), ("round", 0)):
        if col not in s.columns:
            s[col] = default
    cpu = clock == "cpu" and "cpu_seconds" in s.columns
    s["time"] = s["cpu_seconds"] if cpu else s["seconds"]
    is_torch = (s["library"] == "torch") & s["path"].isin(["forloop", "foreach"])
    if "block" in s.columns and "copy_seconds" in s.columns:
        s["per_copy"] = s["time"] / (s["copy_cpu_seconds"] if cpu else s["copy_seconds"])
        partner = s[is_torch].set_index(PAIR_KEYS + BLOCK_KEYS)["time"]
        partner = partner[~partner.index.duplicated()]
        key = pd.MultiIndex.from_frame(s[PAIR_KEYS + BLOCK_KEYS])
        s["per_torch"] = s["time"].to_numpy() / partner.reindex(key).to_numpy()
    else:
        s["per_copy"] = s["time"] / s.loc[s["benchmark"].str.startswith(REFERENCE_PREFIX), "time"].median()
        torch_med = s[is_torch].groupby(PAIR_KEYS)["time"].median()
        key = pd.MultiIndex.from_frame(s[PAIR_KEYS])
        s["per_torch"] = s["time"].to_numpy() / torch_med.reindex(key).to_numpy()
    s.loc[s["library"] != "optparity", "per_torch"] = np.nan
    s["figure"] = s["per_torch"].fillna(s["per_copy"])
    s["figure_name"] = np.where(s["per_torch"].notna(), "optparity/torch", "time/copy_")
    return s


def _quantiles(values: pd.Series) -> dict:
    q1, med, q3 = values.quantile([0.25, 0.5, 0.75]).tolist()
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "n": int(values.size)}


def summarize(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per benchmark: latency and achieved GB/s (median, quartiles), and the achieved
    bandwidth as a fraction of the run's streaming-copy median."""
    s = samples.assign(gbps=samples["bytes_per_step"] / samples["seconds"] / 1e9)
    keys = ["benchmark", "algorithm", "impl", "library", "path", "workload", "dtype", "numel", "n_tensors"]
    rows = []
    for key, g in s.groupby(keys, sort=False):
        t = _quantiles(g["seconds"])
        bw = g["gbps"].quantile([0.25, 0.5, 0.75]).tolist()
        rows.append({**dict(zip(keys, key)), **t, "gbps_q1": bw[0], "gbps": bw[1], "gbps_q3": bw[2]})
    out = pd.DataFrame(rows)
    copy = out.loc[out["benchmark"].str.startswith(REFERENCE_PREFIX), "gbps"]
    copy_gbps = float(copy.iloc[0]) if not copy.empty else float("nan")
    for col in ("gbps_q1", "gbps", "gbps_q3"):
        out[col.replace("gbps", "roofline")] = out[col] / copy_gbps
    return out


def ratios(summary: pd.DataFrame, samples: pd.DataFrame, rule: decide.Rule | None = None,
           quick: bool = False) -> pd.DataFrame:
    """optparity / torch per path, from the paired ratios of neighbouring blocks (figures()):
    median, quartiles (ratio_low, ratio_high) and the within-run test of decide.py (not run on a
    quick run, whose few short blocks cannot support a claim)."""
    keys = ["algorithm", "path", "workload", "dtype"]
    cols = keys + ["numel", "optparity_s", "torch_s", "ratio", "ratio_low", "ratio_high", "n", "p_slower", "slower"]
    paired = figures(samples)
    paired = paired[(paired["library"] == "optparity") & paired["per_torch"].notna()]
    if paired.empty:
        return pd.DataFrame(columns=cols)
    g = paired.groupby(keys, sort=False)["per_torch"]
    out = pd.DataFrame({"ratio": g.median(), "ratio_low": g.quantile(0.25), "ratio_high": g.quantile(0.75),
                        "n": g.size()})
    opt = summary[summary["library"] == "optparity"].set_index(keys)
    ref = summary[(summary["library"] == "torch") & summary["path"].isin(["forloop", "foreach"])].set_index(keys)
    out["numel"] = opt["numel"].reindex(out.index)
    out["optparity_s"] = opt["median"].reindex(out.index)
    out["torch_s"] = ref["median"].reindex(out.index)
    out["p_slower"], out["slower"] = np.nan, False
    if not quick and "block" in samples.columns:  # runs before interleaving have no pairs to test
        names = ["/".join(map(str, k)) for k in out.index]
        test = decide.slower_than_reference(
            {n: grp.to_numpy() for n, (_, grp) in zip(names, g)}, rule or decide.Rule())
        out["p_slower"] = test["p_slower"].to_numpy()
        out["slower"] = test["slower"].to_numpy()
    return out.reset_index()[cols]


def memory_summary(memory: pd.DataFrame) -> pd.DataFrame:
    keys = ["benchmark", "algorithm", "impl", "workload", "dtype", "numel", "metric"]
    rows = [{**dict(zip(keys, key)), **_quantiles(g["bytes"])} for key, g in memory.groupby(keys, sort=False)]
    out = pd.DataFrame(rows)
    out["per_element"] = out["median"] / out["numel"]
    return out


# ---------------------------------------------------------------- figures

_COLORS = dict(zip(IMPLS, ("tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:purple")))
_MARKERS = dict(zip(IMPLS, ("o", "s", "o", "s", "^")))


def _ordered(values, order) -> list:
    present = list(dict.fromkeys(values))
    return [v for v in order if v in present] + [v for v in present if v not in order]


def _yerr(median: pd.Series, low: pd.Series, high: pd.Series):
    return [(median - low).clip(lower=0).to_numpy(), (high - median).clip(lower=0).to_numpy()]


def _grouped_bars(ax, frame: pd.DataFrame, x_col: str, group_col: str, groups: list, x_order: list,
                  value: str, low: str, high: str, colors: dict | None = None) -> None:
    width = 0.8 / max(1, len(groups))
    for k, grp in enumerate(groups):
        part = frame[frame[group_col] == grp].set_index(x_col).reindex(x_order)
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(x_order))]
        ax.bar(xs, part[value], width, yerr=_yerr(part[value], part[low], part[high]), capsize=2,
               label=str(grp), color=(colors or {}).get(grp), error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(x_order)), x_order, rotation=45, ha="right", fontsize=8)


def _legend(fig, axes) -> None:
    """One legend for the figure, outside the panels, from every panel's labelled artists."""
    labelled = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(labelled.values(), labelled.keys(), loc="outside right upper", fontsize=8)


def plot_latency(summary: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Latency vs total parameter elements, one panel per algorithm, one line per implementation."""
    paths = []
    steps = summary[~summary["benchmark"].str.startswith(REFERENCE_PREFIX)]
    for dtype in _ordered(steps["dtype"], list(DTYPES)):
        part = steps[steps["dtype"] == dtype]
        algos = _ordered(part["algorithm"], list(bandwidth.TRAFFIC))
        ncols = min(4, len(algos))
        nrows = -(-len(algos) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols + 1.5, 3.2 * nrows), squeeze=False,
                                 layout="constrained")
        for ax, algo in zip(axes.flat, algos):
            a = part[part["algorithm"] == algo]
            for impl in _ordered(a["impl"], IMPLS):
                r = a[a["impl"] == impl].sort_values("numel")
                ax.errorbar(r["numel"], r["median"] * 1e3, yerr=_yerr(r["median"] * 1e3, r["q1"] * 1e3, r["q3"] * 1e3),
                            label=impl, color=_COLORS.get(impl), marker=_MARKERS.get(impl, "o"), capsize=2)
            wl = a.drop_duplicates("workload").sort_values("numel")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(wl["numel"], [f"{w}\n{n / 1e6:.1f}M" for w, n in zip(wl["workload"], wl["numel"])], fontsize=7)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            # labels at 1, 2, 5 x 10^k only: every minor tick labelled crowded 9 into 10
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 20 rather than 2x10^1
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(algo)
            ax.set_ylabel("ms per step")
        for ax in list(axes.flat)[len(algos):]:
            ax.set_visible(False)
        _legend(fig, axes)
        fig.suptitle(f"Step latency vs parameter elements, {dtype} (median, error bars = IQR)")
        path = out_dir / f"latency_{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_ratio(rat: pd.DataFrame, out_dir: Path) -> Path | None:
    """optparity / torch per path: bars per workload, error bars = quartile band."""
    if rat.empty:
        return None
    dtypes = _ordered(rat["dtype"], list(DTYPES))
    paths = _ordered(rat["path"], ["forloop", "foreach"])
    fig, axes = plt.subplots(len(dtypes), len(paths), figsize=(7 * len(paths) + 1.5, 3.5 * len(dtypes)),
                             squeeze=False, layout="constrained")
    for i, dtype in enumerate(dtypes):
        for j, path in enumerate(paths):
            ax = axes[i][j]
            part = rat[(rat["dtype"] == dtype) & (rat["path"] == path)]
            workloads = _ordered(part.sort_values("numel")["workload"], [])
            _grouped_bars(ax, part, "algorithm", "workload", workloads,
                          _ordered(part["algorithm"], list(bandwidth.TRAFFIC)), "ratio", "ratio_low", "ratio_high")
            ax.axhline(1.0, color="black", lw=0.8)
            limit = 1 + decide.MIN_EFFECT
            ax.axhline(limit, color="red", lw=0.8, ls="--", label=f"{limit:g}x (minimum effect)")
            ax.set_title(f"{path}, {dtype}")
            ax.set_ylabel("optparity / torch time")
    _legend(fig, axes)
    fig.suptitle("optparity / torch step time on the same path (median of paired blocks; error bars: q1..q3)")
    out = out_dir / "ratio.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_roofline(summary: pd.DataFrame, copy_q: dict, out_dir: Path) -> Path | None:
    """Achieved GB/s as a fraction of the streaming copy, per workload and dtype."""
    steps = summary[~summary["benchmark"].str.startswith(REFERENCE_PREFIX)]
    if steps.empty:
        return None
    dtypes = _ordered(steps["dtype"], list(DTYPES))
    workloads = _ordered(steps.sort_values("numel")["workload"], [])
    fig, axes = plt.subplots(len(dtypes), len(workloads), figsize=(6 * len(workloads) + 1.5, 3.5 * len(dtypes)),
                             squeeze=False, layout="constrained")
    for i, dtype in enumerate(dtypes):
        for j, wl in enumerate(workloads):
            ax = axes[i][j]
            part = steps[(steps["dtype"] == dtype) & (steps["workload"] == wl)]
            _grouped_bars(ax, part, "algorithm", "impl", _ordered(part["impl"], IMPLS),
                          _ordered(part["algorithm"], list(bandwidth.TRAFFIC)), "roofline", "roofline_q1",
                          "roofline_q3", _COLORS)
            ax.axhline(1.0, color="black", lw=0.8)
            if copy_q:
                ax.axhspan(copy_q["q1"] / copy_q["median"], copy_q["q3"] / copy_q["median"], color="grey", alpha=0.3,
                           label="copy_ IQR")
            ax.set_title(f"{wl}, {dtype}")
            ax.set_ylabel("fraction of copy_ GB/s")
    _legend(fig, axes)
    fig.suptitle("Achieved bandwidth (minimum bytes/element x elements / step time) over the bandwidth of a "
                 "64 MiB copy_\n(median, error bars = IQR; workloads that fit in cache can exceed 1)")
    out = out_dir / "roofline.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_memory(mem: pd.DataFrame, out_dir: Path) -> Path | None:
    """Optimizer state and per-step temporary peak, in bytes per parameter element."""
    if mem.empty:
        return None
    mem = mem.assign(pe=mem["median"] / mem["numel"], pe_q1=mem["q1"] / mem["numel"], pe_q3=mem["q3"] / mem["numel"])
    dtypes = _ordered(mem["dtype"], list(DTYPES))
    workloads = _ordered(mem.sort_values("numel")["workload"], [])
    panels = [("state_bytes", workloads[-1])] + [("step_peak_bytes", w) for w in workloads]
    fig, axes = plt.subplots(len(dtypes), len(panels), figsize=(5 * len(panels) + 1.5, 3.5 * len(dtypes)),
                             squeeze=False, layout="constrained")
    for i, dtype in enumerate(dtypes):
        for j, (metric, wl) in enumerate(panels):
            ax = axes[i][j]
            part = mem[(mem["dtype"] == dtype) & (mem["workload"] == wl) & (mem["metric"] == metric)]
            _grouped_bars(ax, part, "algorithm", "impl", _ordered(part["impl"], IMPLS),
                          _ordered(part["algorithm"], list(bandwidth.TRAFFIC)), "pe", "pe_q1", "pe_q3", _COLORS)
            ax.set_title(f"{'optimizer state' if metric == 'state_bytes' else 'step temporaries peak'}: {wl}, {dtype}",
                         fontsize=9)
            ax.set_ylabel("bytes per parameter element")
    _legend(fig, axes)
    fig.suptitle("Memory (median, error bars = IQR; allocator accounting is exact, so the IQR is ~0)")
    out = out_dir / "memory.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- text

def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def latency_table(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "benchmark": summary["benchmark"],
        "median ms": summary["median"].map(_fmt_ms),
        "IQR ms": summary["iqr"].map(_fmt_ms),
        "samples": summary["n"],
        "GB/s": summary["gbps"].map("{:.2f}".format),
        "fraction of copy_": summary["roofline"].map("{:.2f}".format),
    })


def ratio_table(rat: pd.DataFrame, quick: bool = False, rule: decide.Rule | None = None) -> pd.DataFrame:
    rule = rule or decide.Rule()

    def call(row) -> str:
        if row["ratio"] <= 1 + rule.min_effect:
            return ""
        if quick:
            return "indicative only (quick run)"
        return f"yes (p={row['p_slower']:.2g} after BH)" if row["slower"] else "within noise"

    return pd.DataFrame({
        "algorithm": rat["algorithm"], "path": rat["path"], "workload": rat["workload"], "dtype": rat["dtype"],
        "optparity ms": rat["optparity_s"].map(_fmt_ms), "torch ms": rat["torch_s"].map(_fmt_ms),
        "ratio (median of paired blocks)": rat["ratio"].map("{:.3f}".format),
        "q1 .. q3": [f"{lo:.3f} .. {hi:.3f}" for lo, hi in zip(rat["ratio_low"], rat["ratio_high"])],
        "blocks": rat["n"],
        f"slower by > {rule.min_effect:.0%}": [call(row) for _, row in rat.iterrows()],
    })


def run_headline(rat: pd.DataFrame, quick: bool, rule: decide.Rule | None = None) -> str:
    """The first sentence of a run's report: how optparity compares with torch's same paths."""
    rule = rule or decide.Rule()
    if rat.empty:
        return "No optparity/torch pair measured: nothing to compare within this run."
    worst = rat.sort_values("ratio", ascending=False).iloc[0]
    worst_text = (f"{worst['algorithm']} {worst['path']} {worst['workload']} {worst['dtype']} "
                  f"{worst['ratio']:.3f}x (q1..q3 {worst['ratio_low']:.3f}..{worst['ratio_high']:.3f})")
    if quick:
        return (f"Quick run, indicative only: {len(rat)} optparity/torch pairs, highest median ratio {worst_text}. "
                "A quick run's few short blocks cannot tell a slowdown from noise; measure without --quick.")
    if rat["p_slower"].isna().all():
        return (f"{len(rat)} optparity/torch pairs, not tested (no interleaved blocks, or too few of them); "
                f"highest median ratio {worst_text}.")
    slow = rat[rat["slower"]].sort_values("ratio", ascending=False)
    if slow.empty:
        return (f"No optparity path slower than torch's by more than {rule.min_effect:.0%} "
                f"({len(rat)} pairs, paired blocks, Wilcoxon + Benjamini-Hochberg at {rule.fdr:.0%}); "
                f"highest median ratio {worst_text}.")
    items = "; ".join(f"{r['algorithm']} {r['path']} {r['workload']} {r['dtype']} {r['ratio']:.3f}x "
                      f"(p={r['p_slower']:.2g})" for _, r in slow.head(3).iterrows())
    more = f"; and {len(slow) - 3} more" if len(slow) > 3 else ""
    return (f"optparity slower than torch's same path by more than {rule.min_effect:.0%} in {len(slow)} of "
            f"{len(rat)} pairs: {items}{more}.")


def memory_table(mem: pd.DataFrame) -> pd.DataFrame:
    wide = mem.pivot_table(index="benchmark", columns="metric", values="median", sort=False)
    return (wide / 2**20).round(3).add_suffix(" MiB").reset_index()


def _copy_quartiles(samples: pd.DataFrame) -> dict:
    copy = samples[samples["benchmark"].str.startswith(REFERENCE_PREFIX)]
    if copy.empty:
        return {}
    return _quantiles(copy["bytes_per_step"] / copy["seconds"] / 1e9)


_STYLE = ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
          "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}"
          ".headline{font-size:1.25em;padding:.6em 1em;border-left:6px solid #2a2;background:#f4fbf4}"
          ".headline.bad{border-color:#c22;background:#fdf3f3}</style>")


def _headline_html(text: str) -> str:
    bad = text.startswith(("REGRESSION", "optparity slower"))
    return f"<p class='headline{' bad' if bad else ''}'>{html.escape(text)}</p>"


def _links(run_dir: Path) -> list[str]:
    """Links to the other reports of this checkout, when they exist."""
    out = []
    numerics = Path(__file__).resolve().parents[3] / "reports" / "numerics" / "index.html"
    if numerics.is_file():  # `optparity characterize`: how far apart torch's own paths are
        out.append(f"<p>See also: <a href='{html.escape(os.path.relpath(numerics, run_dir.resolve()))}'>"
                   "numerics map of torch.optim's paths</a></p>")
    for check_page in sorted((Path(__file__).resolve().parents[3] / "reports" / "check").glob("**/*.html")):
        # `optparity check --html reports/check/...`: the conformance verdicts next to the timings
        rel = os.path.relpath(check_page, run_dir.resolve())
        out.append(f"<p>Conformance: <a href='{html.escape(rel)}'>optparity check report "
                   f"{html.escape(str(check_page.parent.name))}</a></p>")
    return out


BASELINE_KEY = "regression verdict vs baseline"  # run.json: the headline of bench --baseline


def write_report(run_dir: Path, samples: pd.DataFrame, memory: pd.DataFrame | None, meta: dict | None = None,
                 figures: bool = True) -> list[Path]:
    """summary.md, index.html and the PNGs into run_dir; returns the files written. The page
    opens with the headline (the baseline comparison's when bench --baseline ran, else the
    within-run optparity/torch finding), then the ratio and latency plots, then the tables."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    quick = str(meta.get("budget", "")).startswith("quick")
    first = samples[samples["pass"] == 0] if "pass" in samples.columns else samples
    summary = summarize(first)
    rat = ratios(summary, first, quick=quick)
    counted = memory[memory["metric"] == "instructions_per_step"] if memory is not None else pd.DataFrame()
    memory = memory[memory["metric"] != "instructions_per_step"] if memory is not None else None
    mem = memory_summary(memory) if memory is not None and not memory.empty else pd.DataFrame()
    copy_q = _copy_quartiles(first)
    if copy_q:
        meta["copy_ bandwidth GB/s (median [q1, q3])"] = f"{copy_q['median']:.2f} [{copy_q['q1']:.2f}, {copy_q['q3']:.2f}]"
    headlines = [meta[BASELINE_KEY]] if meta.get(BASELINE_KEY) else []
    headlines.append(run_headline(rat, quick))
    pngs: list[Path] = []
    if figures:
        pngs = [p for p in [plot_ratio(rat, run_dir), *plot_latency(summary, run_dir), plot_roofline(summary, copy_q, run_dir),
                            plot_memory(mem, run_dir) if not mem.empty else None] if p is not None]
    used_dtypes = {d: DTYPES[d] for d in _ordered(samples["dtype"], list(DTYPES)) if d in DTYPES}
    traffic = pd.DataFrame(bandwidth.traffic_table(used_dtypes or {"float32": DTYPES["float32"]}))
    traffic = traffic[traffic["algorithm"].isin(samples["algorithm"])]
    slower = rat[rat["ratio"] > 1 + decide.MIN_EFFECT]

    sections = [
        (f"optparity slower than torch's same path by more than {decide.MIN_EFFECT:.0%} (median)",
         ratio_table(slower, quick)),
        ("optparity / torch, every case", ratio_table(rat, quick)),
        ("Step latency", latency_table(summary)),
    ]
    if not mem.empty:
        sections.append(("Memory (median)", memory_table(mem)))
    if not counted.empty:
        sections.append(("Instructions per step (callgrind)", counted[["benchmark", "bytes"]].rename(
            columns={"bytes": "instructions"})))
    sections += [("Bytes moved per element per step (the roofline's numerator)", traffic),
                 ("Run", pd.DataFrame({"key": list(meta), "value": [str(v) for v in meta.values()]}))]

    md = ["# optparity bench", ""] + [f"**{h}**\n" for h in headlines] + [
          "Medians with interquartile ranges; raw samples in `samples.csv` (one row per interleaved block, "
          "with the copy_ reference of that block) and `memory.csv`.", ""]
    md += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>optparity bench</title>", _STYLE,
            "</head><body>", "<h1>optparity bench</h1>"] + [_headline_html(h) for h in headlines]
    page += [f"<h3>{html.escape(p.stem)}</h3><img src='{html.escape(p.name)}'>" for p in pngs]
    page += _links(run_dir)
    for title, table in sections:
        md += [f"## {title}", "", table.to_markdown(index=False) if not table.empty else "(none)", ""]
        page += [f"<h2>{html.escape(title)}</h2>", table.to_html(index=False) if not table.empty else "<p>(none)</p>"]
    page += ["</body></html>"]
    (run_dir / "summary.md").write_text("\n".join(md))
    (run_dir / "index.html").write_text("\n".join(page))
    return [run_dir / "summary.md", run_dir / "index.html", *pngs]


def plot_comparison(table: pd.DataFrame, out: Path, shown: int = 40) -> Path | None:
    """NEW/BASE per timing with its bootstrap interval, the most changed first; one row per
    benchmark on the y axis, so the labels never overlap whatever their number."""
    t = table[(table["kind"] == "time") & table["ratio"].notna()] if "kind" in table.columns else table.iloc[:0]
    if t.empty:
        return None
    t = t.reindex(t["ratio"].sub(1).abs().sort_values(ascending=False).index).head(shown).iloc[::-1]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.28 * len(t)), layout="constrained")
    colors = ["tab:red" if v == decide.REGRESSION else "tab:orange" if v == decide.REMEASURE else "tab:green"
              if v == decide.FASTER else "tab:grey" for v in t["verdict"]]
    low = t["ci_low"].fillna(t["ratio"]) if "ci_low" in t.columns else t["ratio"]
    high = t["ci_high"].fillna(t["ratio"]) if "ci_high" in t.columns else t["ratio"]
    ax.errorbar(t["ratio"], range(len(t)), xerr=_yerr(t["ratio"], low, high), fmt="none", ecolor="black",
                elinewidth=0.8, capsize=2)
    ax.scatter(t["ratio"], range(len(t)), c=colors, zorder=3)
    ax.set_yticks(range(len(t)), t.index, fontsize=7)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.axvline(1 + decide.MIN_EFFECT, color="red", lw=0.8, ls="--")
    ax.set_xlabel("NEW / BASE (normalised figure; 95% bootstrap interval)")
    ax.set_title("Most changed timings (red: regression, orange: needs re-measurement, green: faster)", fontsize=9)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def write_compare_page(path: Path, text: str, table: pd.DataFrame, base: str, new: str, details: str = "") -> Path:
    """The HTML diff page of `optparity report --compare`: headline, plot, then the table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = plot_comparison(table, path.with_suffix(".png"))
    shown = table.reset_index()
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>optparity compare</title>", _STYLE,
            "</head><body>", "<h1>optparity report --compare</h1>", _headline_html(text),
            f"<p>BASE = {html.escape(str(base))}<br>NEW = {html.escape(str(new))}</p>"]
    if details:
        page.append(f"<p>{html.escape(details)}</p>")
    if png is not None:
        page.append(f"<img src='{html.escape(png.name)}'>")
    counted = table[table["kind"] == "instructions"] if "kind" in table.columns else table.iloc[:0]
    if len(counted):  # deterministic: no interval, so no place on the plot; their own table
        page += ["<h2>Instructions per step (callgrind; deterministic, a rise beyond the minimum effect regresses)</h2>",
                 counted[["base", "new", "ratio", "verdict"]].reset_index().to_html(
                     index=False, float_format=lambda v: f"{v:,.4g}" if abs(v) < 100 else f"{v:,.0f}", na_rep="-")]
    page += ["<h2>Every figure</h2>", shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"),
             "</body></html>"]
    path.write_text("\n".join(page))
    return path


def load_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """samples.csv (required), memory.csv and run.json (optional) of a bench run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a bench run directory")
    if not (run_dir / SAMPLES_CSV).is_file():
        raise ReportError(f"{run_dir}: no {SAMPLES_CSV} in this directory (not a bench run, or it was interrupted)")
    samples = load_samples(run_dir / SAMPLES_CSV)
    memory = load_memory(run_dir / MEMORY_CSV) if (run_dir / MEMORY_CSV).exists() else None
    meta = {}
    if (run_dir / META_JSON).exists():
        try:
            meta = json.loads((run_dir / META_JSON).read_text())
        except json.JSONDecodeError as e:
            raise ReportError(f"{run_dir / META_JSON}: malformed JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ReportError(f"{run_dir / META_JSON}: expected a JSON object")
    return samples, memory, meta
