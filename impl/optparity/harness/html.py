"""`optparity check --html DIR`: the case matrix as a grid coloured by verdict, and for each case
whose numbers differ its first divergence and a plot of the error per step (max ULP and max
relative error over every tensor), on which rounding drift and different math look different."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from optparity.harness.check import CheckReport
from optparity.harness.matrix import format_config
from optparity.harness.runner import Verdict
from optparity import versions

COLOURS = {
    Verdict.BIT_IDENTICAL: "#2e7d32", Verdict.WITHIN_TOLERANCE: "#9ccc65", Verdict.NUMERICS_DIFFER: "#c62828",
    Verdict.API_DIFFERS: "#ef6c00", Verdict.NOT_APPLICABLE: "#bdbdbd", Verdict.SAME_ERROR: "#78909c",
    Verdict.ERROR_ONE_SIDE: "#6a1b9a", Verdict.HUNG: "#212121", Verdict.MEASURED_ACROSS_DEVICES: "#0277bd",
}
# A grid cell holds every parameter set of its (config, path, dtype): it shows the worst of them.
SEVERITY = [Verdict.HUNG, Verdict.ERROR_ONE_SIDE, Verdict.NUMERICS_DIFFER, Verdict.API_DIFFERS,
            Verdict.WITHIN_TOLERANCE, Verdict.MEASURED_ACROSS_DEVICES, Verdict.SAME_ERROR, Verdict.NOT_APPLICABLE,
            Verdict.BIT_IDENTICAL]
MAX_PLOTS = 60  # per report; the rest are listed without a plot


def _worst(verdicts) -> str:
    return min(verdicts, key=SEVERITY.index)


def grid(report: CheckReport) -> pd.DataFrame:
    """Rows: algorithm x configuration; columns: path x dtype; values: the worst verdict."""
    rows = [{"algorithm": r.case.algorithm, "config": f"c{r.case.config_index} {format_config(r.case.config)}",
             "path": r.case.path, "dtype": str(r.case.dtype).replace("torch.", ""), "verdict": r.verdict}
            for r in report.results]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    return df.pivot_table(index=["algorithm", "config"], columns=["path", "dtype"], values="verdict",
                          aggfunc=_worst, sort=False)


def _grid_html(report: CheckReport, anchors: dict[str, str]) -> str:
    table = grid(report)
    if table.empty:
        return "<p>(no cases)</p>"
    first_of = {}
    for r in report.results:
        key = (r.case.algorithm, f"c{r.case.config_index} {format_config(r.case.config)}", r.case.path,
               str(r.case.dtype).replace("torch.", ""))
        if r.case.id in anchors and key not in first_of:
            first_of[key] = anchors[r.case.id]
    head = ["<tr><th>algorithm</th><th>configuration</th>"
            + "".join(f"<th>{html.escape(p)}<br>{html.escape(d)}</th>" for p, d in table.columns) + "</tr>"]
    body = []
    for (algo, config), values in table.iterrows():
        cells = []
        for (path, dtype), verdict in values.items():
            if not isinstance(verdict, str):
                cells.append("<td></td>")
                continue
            label = Verdict.LABELS[verdict]
            link = first_of.get((algo, config, path, dtype))
            mark = f"<a href='#{link}' style='color:white'>&#9679;</a>" if link else "&nbsp;"
            cells.append(f"<td title='{html.escape(label)}' style='background:{COLOURS[verdict]};"
                         f"text-align:center'>{mark}</td>")
        body.append(f"<tr><td>{html.escape(algo)}</td><td>{html.escape(config)}</td>{''.join(cells)}</tr>")
    return "<table class='grid'>" + "".join(head + body) + "</table>"


def _legend() -> str:
    return " ".join(f"<span style='background:{COLOURS[v]};color:white;padding:1px 6px'>{html.escape(Verdict.LABELS[v])}"
                    "</span>" for v in SEVERITY)


def plot_errors(result, path: Path) -> Path:
    """Max ULP distance and max relative error per step, log scale (zero steps left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in result.per_step]
    fig, (ax_u, ax_r) = plt.subplots(1, 2, figsize=(8, 2.6))
    for ax, key, title in ((ax_u, "max_ulp", "max ULP distance"), (ax_r, "max_rel_error", "max relative error")):
        values = [float(row[key]) if row[key] else float("nan") for row in result.per_step]
        ax.plot(steps, values, marker="o", color=COLOURS[result.verdict])
        nan_steps = [row["step"] for row in result.per_step if row["nan_inf"]]
        for s in nan_steps:
            ax.axvline(s, color="black", linestyle=":", linewidth=1)
        if any(v == v for v in values):
            ax.set_yscale("log")
        ax.set_title(title + (" (dotted: NaN/inf mismatch)" if nan_steps else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{result.case.id} — {result.math}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _case_section(result, anchor: str, image: str | None) -> str:
    parts = [f"<h3 id='{anchor}'>{html.escape(result.case.id)}</h3>",
             f"<p><b style='color:{COLOURS[result.verdict]}'>{html.escape(Verdict.LABELS[result.verdict])}</b>"
             + (f" — {html.escape(result.math)}" if result.math else "")
             + (f"; worst {result.worst_ulp} ulp, max rel error {result.max_rel_error:.3g}, "
                f"max abs error {result.max_abs_error:.3g}" if result.per_step else "") + "</p>"]
    for title, div in (("first numeric divergence", result.first_numeric), ("first API/layout divergence", result.first_api),
                       ("error", result.error)):
        if div is not None:
            parts.append(f"<p>{title}: <code>{html.escape(div.describe())}</code></p>")
    if result.worst:
        w = result.worst
        parts.append(f"<p>worst element: step {w['step']}, {html.escape(str(w['where']))} "
                     f"{html.escape(str(w['param'] or ''))} {html.escape(repr(w['key']) if w['key'] else '')} "
                     f"element {w['element']}</p>")
    if result.traceback:
        parts.append(f"<details><summary>candidate's traceback</summary><pre>{html.escape(result.traceback)}</pre></details>")
    if image:
        parts.append(f"<img src='{html.escape(image)}' alt='error per step'>")
    return "\n".join(parts)


def write_html(reports: CheckReport | list[CheckReport], out_dir: str | Path) -> Path:
    """DIR/index.html plus one PNG per plotted case; returns the page's path."""
    from optparity.harness.report import counts, rejected_options, version_drift_line

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = [reports] if isinstance(reports, CheckReport) else list(reports)
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>optparity check</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:11px}"
            "td,th{border:1px solid #ddd;padding:2px 5px}.grid td{min-width:1.6em}img{max-width:100%}"
            "code{font-size:11px}</style></head><body><h1>optparity check</h1>",
            f"<p>compared against: {html.escape(versions.compared_against())}</p>", f"<p>{_legend()}</p>"]
    for n, report in enumerate(reports):
        per = counts(report.results)
        differing = [r for r in report.results if r.verdict not in
                     (Verdict.BIT_IDENTICAL, Verdict.NOT_APPLICABLE, Verdict.SAME_ERROR)]
        anchors = {r.case.id: f"r{n}c{i}" for i, r in enumerate(differing)}
        page += [f"<h2>{html.escape(report.candidate)} against {html.escape(report.reference)}: "
                 f"{'OK' if report.ok else 'differs'}</h2>",
                 "<p>" + ", ".join(f"{html.escape(Verdict.LABELS[v])}: {k}" for v, k in per.items() if k) + "</p>"]
        if (drift := version_drift_line(report)):
            page.append(f"<p><b>{html.escape(drift)}</b></p>")
        rejected = rejected_options(report.results)
        if rejected:
            page.append("<p>options the candidate rejected: "
                        + ", ".join(f"{html.escape(o)} ({k} cases)" for o, k in rejected.items()) + "</p>")
        page.append(_grid_html(report, anchors))
        if differing:
            page.append(f"<h2>Cases that differ ({len(differing)})</h2>")
        plotted = 0
        for r in differing:
            image = None
            if r.per_step and plotted < MAX_PLOTS:
                image = plot_errors(r, out / f"{anchors[r.case.id]}.png").name
                plotted += 1
            page.append(_case_section(r, anchors[r.case.id], image))
        if plotted == MAX_PLOTS and sum(bool(r.per_step) for r in differing) > MAX_PLOTS:
            page.append(f"<p>(plots shown for the first {MAX_PLOTS} numeric differences only)</p>")
    page.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(page))
    return index
