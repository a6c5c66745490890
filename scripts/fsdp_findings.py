"""Re-measure the FSDP finding table of docs/distributed-check.md ("FSDP kinds").

Every torch.optim algorithm as the candidate under --kind fsdp and --kind fsdp1, world sizes 2
and 3, at the quick level (the default path), then torch's fused classes on the fused path three
ways: against the same class on the same sharding (what the check does), against the fused class
unsharded, and against the unsharded for-loop path (the last two measure, they do not judge).

    nice -n 19 .venv/bin/python scripts/fsdp_findings.py [--kinds fsdp,fsdp1] [--json out.json]

Prints one markdown row per (kind, algorithm) and per fused measurement; takes 10-20 minutes on
two cores.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter

import torch

from optparity.harness import matrix
from optparity.harness.algorithms import ALGORITHMS, spec
from optparity.harness.distributed.engine import Pools, check
from optparity.harness.distributed.kinds.fsdp import FUSED_REFERENCE_ENV


def summary(report) -> dict:
    """Verdict counts, the distance over the cases that differ, the first failure's message."""
    differ = [r for r in report.results if r.verdict == "numerics_differ"]
    first = report.first_failure
    return {
        "cases": len(report.results),
        "verdicts": dict(Counter(r.verdict for r in report.results)),
        "worst_ulp": max((r.worst_ulp for r in differ), default=0),
        "max_rel_error": max((r.max_rel_error for r in differ), default=0.0),
        "differ_cases": sorted(r.case.id for r in differ),
        "first_failure": None if first is None else first.message.splitlines()[0][:400],
        "not_applicable": next((r.message for r in report.results if r.verdict == "not_applicable"), None),
    }


def row(label: str, s: dict) -> str:
    counts = ", ".join(f"{n} {v}" for v, n in sorted(s["verdicts"].items()))
    dist = f"{s['worst_ulp']} ulp, rel {s['max_rel_error']:.3g}" if s["worst_ulp"] or s["max_rel_error"] else ""
    why = s["first_failure"] or s["not_applicable"] or ""
    return f"| {label} | {s['cases']}: {counts} | {dist} | {why} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="fsdp,fsdp1")
    ap.add_argument("--algorithms", default=",".join(a for a in ALGORITHMS if spec(a).kind != "closure"))
    ap.add_argument("--world-sizes", default="2,3")
    ap.add_argument("--no-fused", action="store_true", help="skip the fused measurements")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    sizes = [int(w) for w in args.world_sizes.split(",")]
    algos = args.algorithms.split(",")
    out = {}
    pools = Pools("gloo", 300)
    try:
        for kind in args.kinds.split(","):
            for algo in algos:
                report = check(f"torch.optim:{algo}", kind=kind, world_sizes=sizes, level="quick", pools=pools)
                out[f"{kind}/{algo}"] = s = summary(report)
                print(row(f"{kind} {algo}", s), flush=True)
    finally:
        pools.close()
    if not args.no_fused:
        fused = [a for a in algos if matrix._runs(a, "fused", torch.float32)]
        for against in ("sharded", "unsharded", "unsharded-forloop"):
            os.environ[FUSED_REFERENCE_ENV] = against  # read by the ranks, forked after this
            pools = Pools("gloo", 300)
            try:
                for kind in args.kinds.split(","):
                    for algo in fused:
                        report = check(f"torch.optim:{algo}", kind=kind, world_sizes=sizes, level="default",
                                       paths=["fused"], case_filter=r",steps$", pools=pools)
                        out[f"fused:{against}/{kind}/{algo}"] = s = summary(report)
                        print(row(f"fused vs {against}: {kind} {algo}", s), flush=True)
            finally:
                pools.close()
        os.environ.pop(FUSED_REFERENCE_ENV, None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
