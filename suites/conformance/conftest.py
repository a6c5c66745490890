"""Prints conformance throughput (cases/second) at the end of the run."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    cases = seconds = 0.0
    for reports in terminalreporter.stats.values():
        for rep in reports:
            props = dict(getattr(rep, "user_properties", ()) or ())
            if getattr(rep, "when", None) == "call" and "cases" in props:
                cases += props["cases"]
                seconds += props["check_seconds"]
    if cases:
        terminalreporter.write_sep("-", "conformance throughput")
        terminalreporter.write_line(
            f"{int(cases)} cases in {seconds:.1f} s of checking: {cases / seconds:.0f} cases/s per core")
