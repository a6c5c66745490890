"""How a check is shown: a terminal summary, JSON, and JUnit XML for CI.

row(result) and junit_case(result, candidate) are the per-case building blocks (an engine that
streams results writes them as they come); format_text / write_json / write_junit the whole."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pandas as pd

from optparity.harness.check import CheckReport
from optparity.harness.matrix import format_config
from optparity.harness.bitwise import readable_rel, readable_ulp
from optparity.harness.runner import Verdict
from optparity import versions


def _div(d):
    return d.as_dict() if d is not None else None


def row(r) -> dict:
    """One case as plain data (JSON-ready)."""
    c = r.case
    return {
        "case": c.id, "algorithm": c.algorithm, "path": c.path, "dtype": str(c.dtype).replace("torch.", ""),
        "param_set": c.param_set, "config": format_config(c.config), "verdict": r.verdict, "status": r.status,
        "math": r.math, "steps": r.steps_run, "worst_ulp": r.worst_ulp, "worst": r.worst,
        "max_abs_error": r.max_abs_error, "max_rel_error": r.max_rel_error,
        "nan_mismatches": r.nan_mismatches, "inf_mismatches": r.inf_mismatches,
        "fused_vs_forloop_ulp": r.fused_vs_forloop_ulp, "rejected_options": list(r.rejected_options),
        "hung_step": r.hung_step, "seconds": round(r.seconds, 6), "message": r.message,
        "first_divergence": _div(r.divergence), "first_numeric_divergence": _div(r.first_numeric),
        "first_api_divergence": _div(r.first_api), "error": _div(r.error), "traceback": r.traceback or None,
        "per_step": r.per_step or None, "shadow": r.shadow, "reference_suspect": r.reference_suspect or None,
        "layout": r.layout or None, "outcome": outcome(r),
        **(c.report_fields() if hasattr(c, "report_fields") else {}),  # distributed cases: world size, ...
    }


_row = row  # older name


def counts(results) -> dict[str, int]:
    """Cases per verdict, every verdict present (zeros included)."""
    got = Counter(r.verdict for r in results)
    return {v: got.get(v, 0) for v in Verdict.ALL}


def rejected_options(results) -> dict[str, int]:
    """Option -> number of cases the candidate could not run because it does not accept it."""
    got = Counter(o for r in results for o in r.rejected_options)
    return dict(sorted(got.items()))


_COLUMNS = {Verdict.BIT_IDENTICAL: "identical", Verdict.WITHIN_TOLERANCE: "tolerated",
            Verdict.NUMERICS_DIFFER: "numerics", Verdict.API_DIFFERS: "api", Verdict.NOT_APPLICABLE: "n/a",
            Verdict.SAME_ERROR: "same_error", Verdict.ERROR_ONE_SIDE: "error", Verdict.HUNG: "hung",
            Verdict.MEASURED_ACROSS_DEVICES: "measured"}


def summary_table(report: CheckReport) -> pd.DataFrame:
    df = pd.DataFrame([row(r) for r in report.results])
    if df.empty:
        return df
    grouped = df.groupby(["algorithm", "path", "dtype"], sort=True)
    table = grouped.agg(cases=("verdict", "size"))
    for verdict in Verdict.ALL:
        n = grouped["verdict"].agg(lambda s, v=verdict: int((s == v).sum()))
        if n.any():
            table[_COLUMNS[verdict]] = n
    worst = grouped["worst_ulp"].agg(lambda s: max(int(v) for v in s))
    # numbers stay numbers (right-aligned) unless one is past 2^53, shown as "huge (>2^53)"
    table["worst_ulp"] = worst.map(readable_ulp) if any(v > 2 ** 53 for v in worst) else worst
    fused = grouped["fused_vs_forloop_ulp"].max()
    if fused.notna().any():
        table["fused_vs_forloop_ulp"] = fused.map(lambda v: "" if pd.isna(v) else int(v))
    return table


def verdict_line(r) -> str:
    """One line per case: its id, its verdict, and what it rests on."""
    label = Verdict.LABELS[r.verdict] + (f" ({r.math})" if r.math and r.verdict == Verdict.NUMERICS_DIFFER else "")
    return f"{r.case.id}: {label}" + (f": {r.message}" if r.message else "")


def _mode(report: CheckReport) -> list[str]:
    lines = []
    if any(r.max_ulp is not None for r in report.results):
        tol = max(r.max_ulp for r in report.results if r.max_ulp is not None)
        lines.append(f"TOLERANCE MODE: numeric differences up to {tol} ULP (no NaN/inf mismatch) pass as "
                     f"'within tolerance' — this is not a bit-for-bit check")
    if any(r.numerics_only for r in report.results):
        lines.append("numerics only: API/layout differences (state keys, param-group keys, state_dict) are "
                     "reported but do not fail; state dicts are not cross-loaded")
    return lines


def _across_devices(results) -> list[str]:
    """The report line of cases whose reference ran on another device (check --reference-device)."""
    measured = [r for r in results if r.verdict == Verdict.MEASURED_ACROSS_DEVICES]
    if not measured:
        return []
    worst = max(measured, key=lambda r: (r.worst_ulp, r.max_rel_error))
    pairs = sorted({f"candidate on {r.case.device}, reference on {r.case.reference_device}" for r in measured})
    line = (f"measured across devices ({'; '.join(pairs)}), not claimed equal: {len(measured)} cases, "
            f"{sum(1 for r in measured if r.first_numeric is None)} without a difference; max {worst.worst_ulp} ulp "
            f"in {worst.case.id}{_where(worst.worst)}; max abs err {max(r.max_abs_error for r in measured):.3g}, "
            f"max rel err {max(r.max_rel_error for r in measured):.3g}")
    nan_inf = sum(r.nan_mismatches + r.inf_mismatches for r in measured)
    return [line + (f"; {nan_inf} NaN/inf mismatches" if nan_inf else "")]


def version_drift(report: CheckReport) -> bool:
    """optparity's own implementation differs from a torch release it does not mirror: upstream's
    math moved between releases (reported as version drift, still a failure: never a silent pass)."""
    return (bool(report.failed) and versions.is_optparity_subject(report.candidate)
            and not versions.mirrors_installed())


def version_drift_line(report: CheckReport) -> str | None:
    if not version_drift(report):
        return None
    first = report.failed[0]
    return (f"VERSION DRIFT: {report.candidate} mirrors torch {versions.MIRRORS_TORCH}, this is torch "
            f"{versions.torch.__version__}: {len(report.failed)} cases differ, first {verdict_line(first)}")


def _configs_note() -> list[str]:
    from optparity.harness.torch_tests import note

    line = note()
    return [line] if line else []


def format_text(report: CheckReport) -> str:
    lines = [f"candidate: {report.candidate}", f"reference: {report.reference}",
             f"compared against: {versions.compared_against()}", *_configs_note(), *_mode(report), ""]
    table = summary_table(report)
    lines.append(table.to_string() if not table.empty else "(no cases)")
    lines.append("")
    results = report.results
    n, per = len(results), counts(results)
    fails = report.failed
    lines.append(f"{n} cases, {per[Verdict.BIT_IDENTICAL]} bit-identical, {len(fails)} differ, "
                 f"{per[Verdict.NOT_APPLICABLE]} not applicable; worst ULP distance {readable_ulp(report.worst_ulp)}; "
                 f"{report.seconds:.2f} s ({report.cases_per_second:.0f} cases/s)")
    lines.append("by verdict: " + ", ".join(f"{Verdict.LABELS[v]} {k}" for v, k in per.items() if k))
    numeric = [r for r in results if r.verdict == Verdict.NUMERICS_DIFFER]
    if numeric:
        maths = Counter(r.math for r in numeric)
        worst = max(numeric, key=lambda r: (r.worst_ulp, r.max_rel_error))
        lines.append(f"numerics: {maths.get('rounding-level', 0)} rounding-level, {maths.get('different math', 0)} "
                     f"different math; max rel error {readable_rel(max(r.max_rel_error for r in numeric))}; "
                     f"worst {readable_ulp(worst.worst_ulp)} ulp in {worst.case.id}" + _where(worst.worst))
        nan_inf = sum(r.nan_mismatches + r.inf_mismatches for r in numeric)
        if nan_inf:
            lines.append(f"  NaN/inf mismatches (not counted as ULPs): "
                         f"{sum(r.nan_mismatches for r in numeric)} NaN vs number, "
                         f"{sum(r.inf_mismatches for r in numeric)} infinity")
    lines += _across_devices(results)
    lines += _layout_lines(results)
    cause = cause_lines(results)
    if cause:
        lines += ["by cause (what the failing cases have in common):", *cause]
    suspects = [r for r in results if r.reference_suspect and r.verdict != Verdict.BIT_IDENTICAL]
    if suspects:
        lines.append(f"reference suspect in {len(suspects)} cases (torch's own path is known wrong or "
                     f"nondeterministic there): " + "; ".join(sorted({r.reference_suspect for r in suspects})))
    rejected = rejected_options(results)
    if rejected:
        lines.append("options the candidate rejected (cases not applicable): "
                     + ", ".join(f"{o} ({k})" for o, k in rejected.items()))
    if fails:
        first = fails[0]
        lines += ["", f"FIRST DIVERGENCE: {first.case.id}",
                  f"  [{Verdict.LABELS[first.verdict]}] {shorten(first.message, 3 * SHORT)}"]
        d = first.divergence.difference if first.divergence else None
        if d is not None and d.numeric:
            lines.append(f"  candidate={d.candidate!r} reference={d.reference!r} abs_err={d.abs_error:.6g} "
                         f"ulp={readable_ulp(d.ulp)} (worst over this case: {readable_ulp(first.worst_ulp)} ulp"
                         f"{_where(first.worst)})")
        if (drift := version_drift_line(report)):
            lines.append(drift)
    for verdict in (Verdict.NUMERICS_DIFFER, Verdict.API_DIFFERS, Verdict.ERROR_ONE_SIDE, Verdict.HUNG,
                    Verdict.SAME_ERROR):
        firsts = [r for r in results if r.verdict == verdict]
        if firsts and not (fails and firsts[0] is fails[0]):
            lines.append(f"first {Verdict.LABELS[verdict]}: {shorten(verdict_line(firsts[0]), 2 * SHORT)}")
    skips = [r for r in results if r.verdict == Verdict.NOT_APPLICABLE]
    if skips and not rejected:
        lines += ["", "not applicable: " + "; ".join(shorten(m) for m in sorted({r.message for r in skips}))]
    return "\n".join(lines)


# --- by configuration and by cause ------------------------------------------------------------

SHORT = 240  # characters of a message in the terminal summary (JSON and HTML keep it whole)


def shorten(text: str, limit: int = SHORT) -> str:
    """`text` cut to about `limit` characters, each side of a "candidate: ... | reference: ..."
    pair on its own (a backend list torch prints in both would fill the screen)."""
    if len(text) <= limit:
        return text
    if " | " in text:
        parts = text.split(" | ")
        return " | ".join(shorten(p, max(limit // len(parts), 80)) for p in parts)
    return text[:limit].rstrip() + f"... ({len(text)} chars, whole in --json)"


def outcome(r) -> str | None:
    """What a case came to, as a cause is named: None for a case whose numbers match."""
    if r.numbers_match and r.verdict != Verdict.API_DIFFERS:
        return None
    if r.verdict == Verdict.NUMERICS_DIFFER:
        return f"numerics differ ({r.math})" if r.math else "numerics differ"
    if r.verdict == Verdict.NOT_APPLICABLE:
        return f"not applicable (rejects {', '.join(r.rejected_options)})" if r.rejected_options else "not applicable"
    if r.verdict in (Verdict.ERROR_ONE_SIDE, Verdict.SAME_ERROR) and r.error is not None:
        text = r.error.message.split(" | ")[0].removeprefix("candidate: ").removeprefix("both raised ")
        first = text.splitlines()[0] if text else ""
        return f"{Verdict.LABELS[r.verdict]} ({shorten(first, 90)})"
    if r.verdict == Verdict.API_DIFFERS and r.layout:
        return "state-dict layout differs (numbers identical)"
    return Verdict.LABELS[r.verdict]


def _features(case) -> list[str]:
    """What tells cases apart, options first: each config item, then parameter set, dtype, path, axis."""
    items = [format_config({k: v}) for k, v in case.config.items()]
    items += [f"param_set={case.param_set}", f"dtype={str(case.dtype).replace('torch.', '')}", f"path={case.path}"]
    if getattr(case, "axis", "base") != "base":
        items.append(f"axis={case.axis}")
    return items


def causes(results) -> list[dict]:
    """Each failing outcome explained by what its cases have in common: greedily, the case feature
    (a config item, the parameter set, dtype, path or edge axis) present in the most remaining
    cases of that outcome and in (almost, 90%) no case without it. One row per (outcome, feature);
    the cases no feature explains in a last row with feature None."""
    feats = [set(_features(r.case)) for r in results]
    outcomes = [outcome(r) for r in results]
    # a case that errs or is not applicable shows no numbers: it neither supports nor contradicts
    # a cause of numeric or layout outcomes
    silent = {i for i, r in enumerate(results) if r.verdict in _SILENT}
    rows = []
    for label, _ in Counter(o for o in outcomes if o).most_common():
        mine = {i for i, o in enumerate(outcomes) if o == label}
        ignored = silent - mine if not mine & silent else set()
        if len(mine) == len(results):
            rows.append({"outcome": label, "cases": len(mine), "feature": None, "of_feature": len(mine), "all": True})
            continue
        left = set(mine)
        for _ in range(4):
            best = None
            for f in sorted({f for i in left for f in feats[i]}):
                having = {i for i, fs in enumerate(feats) if f in fs} - ignored
                hit = len(having & left)
                if len(having & mine) >= 0.9 * len(having) and hit >= 2 and (best is None or hit > best[1]):
                    best = (f, hit, having)
            if best is None:
                break
            f, hit, having = best
            rows.append({"outcome": label, "cases": hit, "feature": f, "of_feature": len(having), "all": False})
            left -= having
        if left:
            rows.append({"outcome": label, "cases": len(left), "feature": None, "of_feature": None, "all": False,
                         "first": results[min(left)].case.id})
    return rows


_SILENT = (Verdict.ERROR_ONE_SIDE, Verdict.SAME_ERROR, Verdict.NOT_APPLICABLE, Verdict.HUNG)


def cause_lines(results) -> list[str]:
    out = []
    for row in causes(results):
        if row["all"]:
            out.append(f"  {row['outcome']}: every case ({row['cases']})")
        elif row["feature"]:
            out.append(f"  {row['outcome']}: {row['cases']} cases, those with {row['feature']} "
                       f"({row['cases']} of its {row['of_feature']})")
        else:
            out.append(f"  {row['outcome']}: {row['cases']} other cases (first: {row['first']})")
    return out


def by_config(results) -> pd.DataFrame:
    """Per configuration: how many cases came to each outcome (matching numbers: "ok"), and which dominates."""
    df = pd.DataFrame([{"config": f"c{r.case.config_index}[{format_config(r.case.config)}]",
                        "outcome": outcome(r) or "ok"} for r in results])
    if df.empty:
        return df
    table = pd.crosstab(df["config"], df["outcome"])
    table.insert(0, "dominant", table.idxmax(axis=1))
    return table


def _layout_lines(results) -> list[str]:
    """One line per state-dict layout difference, with the numeric verdict beside it."""
    out = []
    for layout, group in _grouped(results, lambda r: r.layout):
        numbers = Counter("numbers identical" if r.first_numeric is None else f"numerics differ ({r.math})"
                          for r in group)
        out.append(f"state-dict layout ({len(group)} cases): {shorten(layout, 400)}; numeric verdict: "
                   + ", ".join(f"{k} {n}" for k, n in numbers.most_common()))
    return out


def _grouped(results, key):
    groups: dict = {}
    for r in results:
        k = key(r)
        if k:
            groups.setdefault(k, []).append(r)
    return list(groups.items())


def exit_reason(report: CheckReport) -> str:
    """Why the check exits as it does, in one line."""
    results = report.results
    if getattr(report, "interrupted", False):
        return "interrupted: partial results"
    if not results:
        return "exit 1: no case ran"
    failed = report.failed
    if failed:
        text = f"exit 1: {len(failed)} of {len(results)} cases differ"
        if all(r.verdict == Verdict.API_DIFFERS for r in failed):
            text += " in API/layout only (their numbers match): --numerics-only checks the numbers alone"
        return text
    if not any(r.numbers_match for r in results):
        parts = ", ".join(f"{Verdict.LABELS[v]} {k}" for v, k in counts(results).items() if k)
        return f"exit 1: no case showed matching numbers ({parts}), so nothing was proven bit-identical"
    if not report.ok:
        return "exit 1: the run did not finish"
    return "exit 0: every case that ran has torch's numbers"


def _where(worst: dict | None) -> str:
    if not worst:
        return ""
    key = f"[{worst['key']!r}]" if worst.get("key") else ""
    return f", at step {worst['step']}, {worst['where']} {worst['param'] or ''}{key} element {worst['element']}"


def report_doc(report: CheckReport) -> dict:
    return {
        "candidate": report.candidate, "reference": report.reference, "ok": report.ok,
        "torch": versions.info(), "version_drift": version_drift(report),
        "cases": len(report.results), "failed": len(report.failed), "worst_ulp": report.worst_ulp,
        "counts": counts(report.results), "rejected_options": rejected_options(report.results),
        "planned": getattr(report, "planned", len(report.results)),
        "finished": getattr(report, "finished", True), "interrupted": getattr(report, "interrupted", False),
        "seconds": report.seconds, "exit_reason": exit_reason(report),
        "by_cause": causes(report.results), "by_config": _config_doc(report.results),
        "results": [row(r) for r in report.results],
    }


def _config_doc(results) -> dict:
    table = by_config(results)
    return {} if table.empty else {c: {k: (int(v) if k != "dominant" else v) for k, v in table.loc[c].items()}
                                   for c in table.index}


_report_doc = report_doc


def _cached(report: CheckReport, kind: str, make) -> str:
    """make(report) once a report is finished (its results no longer change): a check --all
    rewrites its outputs as results come in, and would otherwise serialise every finished
    candidate again each time, on the cores the workers need."""
    if not getattr(report, "finished", False):
        return make(report)
    key = (len(report.results), report.interrupted)
    cache = report.__dict__.setdefault("_serialised", {})
    if cache.get(kind, (None,))[0] != key:
        cache[kind] = (key, make(report))
    return cache[kind][1]


def write_json(reports: CheckReport | list[CheckReport], path: str | Path) -> None:
    """One report as is; several (check --all) under "reports" with overall totals."""
    if isinstance(reports, CheckReport):
        text = json.dumps(report_doc(reports), indent=1, default=str)
    else:
        totals = {"ok": all(r.ok for r in reports), "torch": versions.info(),
                  "version_drift": [r.candidate for r in reports if version_drift(r)],
                  "cases": sum(len(r.results) for r in reports),
                  "failed": sum(len(r.failed) for r in reports),
                  "counts": counts([x for r in reports for x in r.results])}
        parts = [_cached(r, "json", lambda r: json.dumps(report_doc(r), indent=1, default=str)) for r in reports]
        text = json.dumps(totals, indent=1, default=str)[:-2] + ',\n "reports": [\n' + ",\n".join(parts) + "\n ]\n}"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def junit_case(r, candidate: str) -> ET.Element:
    """A <testcase> for one result: failure for a failing verdict, skipped for not applicable."""
    tc = ET.Element("testcase", classname=f"optparity.{r.case.algorithm}",
                    name=f"{candidate} {r.case.id}", time=f"{r.seconds:.6f}")
    props = ET.SubElement(tc, "properties")
    ET.SubElement(props, "property", name="verdict", value=r.verdict)
    if r.math:
        ET.SubElement(props, "property", name="math", value=r.math)
    if r.status == "fail":
        failure = ET.SubElement(tc, "failure", message=f"{Verdict.LABELS[r.verdict]}: {r.message}", type=r.verdict)
        failure.text = json.dumps(_div(r.divergence), default=str) + ("\n" + r.traceback if r.traceback else "")
    elif r.status == "skip":
        ET.SubElement(tc, "skipped", message=r.message)
    return tc


def _junit_suite(report: CheckReport) -> ET.Element:
    suite = ET.Element("testsuite", name=f"optparity check {report.candidate}", tests=str(len(report.results)),
                       failures=str(len(report.failed)),
                       skipped=str(sum(r.status == "skip" for r in report.results)), time=f"{report.seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    for key, value in versions.info().items():
        ET.SubElement(props, "property", name=key, value=str(value))
    ET.SubElement(props, "property", name="version_drift", value=str(version_drift(report)))
    for r in report.results:
        suite.append(junit_case(r, report.candidate))
    return suite


def write_junit(reports: CheckReport | list[CheckReport], path: str | Path) -> None:
    suites = [_cached(r, "junit", lambda r: ET.tostring(_junit_suite(r), encoding="unicode"))
              for r in ([reports] if isinstance(reports, CheckReport) else reports)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("<?xml version='1.0' encoding='utf-8'?>\n<testsuites>" + "".join(suites) + "</testsuites>",
                          encoding="utf-8")
