"""How a check is shown: a terminal summary, JSON, and JUnit XML for CI."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from optparity.harness.check import CheckReport
from optparity.harness.matrix import format_config


def _row(r) -> dict:
    c = r.case
    return {
        "case": c.id, "algorithm": c.algorithm, "path": c.path, "dtype": str(c.dtype).replace("torch.", ""),
        "param_set": c.param_set, "config": format_config(c.config), "status": r.status,
        "steps": r.steps_run, "worst_ulp": r.worst_ulp, "fused_vs_forloop_ulp": r.fused_vs_forloop_ulp,
        "seconds": round(r.seconds, 6), "message": r.message,
        "first_divergence": r.divergence.as_dict() if r.divergence else None,
    }


def summary_table(report: CheckReport) -> pd.DataFrame:
    df = pd.DataFrame([_row(r) for r in report.results])
    if df.empty:
        return df
    grouped = df.groupby(["algorithm", "path", "dtype"], sort=True)
    table = grouped.agg(
        cases=("status", "size"),
        passed=("status", lambda s: int((s == "pass").sum())),
        failed=("status", lambda s: int((s == "fail").sum())),
        skipped=("status", lambda s: int((s == "skip").sum())),
        worst_ulp=("worst_ulp", "max"),
    )
    fused = grouped["fused_vs_forloop_ulp"].max()
    if fused.notna().any():
        table["fused_vs_forloop_ulp"] = fused.map(lambda v: "" if pd.isna(v) else int(v))
    return table


def format_text(report: CheckReport) -> str:
    lines = [f"candidate: {report.candidate}", f"reference: {report.reference}", ""]
    table = summary_table(report)
    lines.append(table.to_string() if not table.empty else "(no cases)")
    lines.append("")
    n = len(report.results)
    fails = report.failed
    skips = [r for r in report.results if r.status == "skip"]
    lines.append(f"{n} cases, {n - len(fails) - len(skips)} bit-identical, {len(fails)} differ, "
                 f"{len(skips)} not applicable; worst ULP distance {report.worst_ulp}; "
                 f"{report.seconds:.2f} s ({report.cases_per_second:.0f} cases/s)")
    if fails:
        first = fails[0]
        lines += ["", f"FIRST DIVERGENCE: {first.case.id}", f"  {first.message}"]
        d = first.divergence.difference if first.divergence else None
        if d is not None and d.reason == "value":
            lines.append(f"  candidate={d.candidate!r} reference={d.reference!r} abs_err={d.abs_error:.6g} "
                         f"ulp={d.ulp} (worst over this case: {first.worst_ulp} ulp)")
    if skips:
        reasons = sorted({r.message for r in skips})
        lines += ["", "not applicable: " + "; ".join(reasons)]
    return "\n".join(lines)


def _report_doc(report: CheckReport) -> dict:
    return {
        "candidate": report.candidate, "reference": report.reference, "ok": report.ok,
        "cases": len(report.results), "failed": len(report.failed), "worst_ulp": report.worst_ulp,
        "seconds": report.seconds, "results": [_row(r) for r in report.results],
    }


def write_json(reports: CheckReport | list[CheckReport], path: str | Path) -> None:
    """One report as is; several (check --all) under "reports" with overall totals."""
    if isinstance(reports, CheckReport):
        doc = _report_doc(reports)
    else:
        doc = {"ok": all(r.ok for r in reports), "cases": sum(len(r.results) for r in reports),
               "failed": sum(len(r.failed) for r in reports), "reports": [_report_doc(r) for r in reports]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def _junit_suite(report: CheckReport) -> ET.Element:
    suite = ET.Element("testsuite", name=f"optparity check {report.candidate}", tests=str(len(report.results)),
                       failures=str(len(report.failed)),
                       skipped=str(sum(r.status == "skip" for r in report.results)), time=f"{report.seconds:.3f}")
    for r in report.results:
        tc = ET.SubElement(suite, "testcase", classname=f"optparity.{r.case.algorithm}",
                           name=f"{report.candidate} {r.case.id}", time=f"{r.seconds:.6f}")
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=r.message).text = json.dumps(_row(r)["first_divergence"], default=str)
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=r.message)
    return suite


def write_junit(reports: CheckReport | list[CheckReport], path: str | Path) -> None:
    root = ET.Element("testsuites")
    for report in [reports] if isinstance(reports, CheckReport) else reports:
        root.append(_junit_suite(report))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
