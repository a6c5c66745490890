"""Re-measure the FSDP finding table of docs/distributed-check.md ("FSDP kinds").

Every torch.optim algorithm as the candidate under --kind fsdp and --kind fsdp1, world sizes 2
and 3, at the quick level (the default path), then torch's fused classes on the fused path three
ways: against the same class on the same sharding (what the check does), against the fused class
unsharded, and against the unsharded for-loop path (the last two measure, they do not judge).

    nice -n 19 .venv/bin/python scripts/fsdp_findings.py [--kinds fsdp,fsdp1] [--json out.json]

Prints one markdown row per (kind, algorithm) and per fused measurement; takes 10-20 minutes on
two cores. LBFGS (a closure optimizer, left out of the matrix) is measured by hand
(lbfgs_on_shards): a weighted quadratic whose gradient each rank computes for its own elements,
three steps of torch's LBFGS sharded against the same unsharded.
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


LBFGS_HYPER = {"lr": 0.5, "max_iter": 5, "history_size": 4}
LBFGS_STEPS = 3


def lbfgs_on_shards(rank: int, ws: int, flavour: str, shapes: list) -> dict:
    """torch's LBFGS on FSDP shards (flavour fsdp2 or fsdp1) against itself unsharded, per step:
    the worst ULP distance and relative error of the full parameters, or the error raised."""
    from optparity.harness.bitwise import compare
    from optparity.harness.distributed.base import RankContext
    from optparity.harness.distributed.kinds.fsdp import FsdpSide

    gen = torch.Generator().manual_seed(0)
    x0, target = [torch.randn(s, generator=gen) for s in shapes], [torch.randn(s, generator=gen) for s in shapes]
    weight = [torch.rand(s, generator=gen) + 0.5 for s in shapes]

    ref = [x.clone().requires_grad_() for x in x0]
    ref_opt = torch.optim.LBFGS(ref, **LBFGS_HYPER)

    def ref_closure():  # loss sum(w (x - t)^2); its gradient 2 w (x - t), element-wise
        for p, t, w in zip(ref, target, weight):
            p.grad = 2 * w * (p.detach() - t)
        return sum(((p.detach() - t) ** 2 * w).sum() for p, t, w in zip(ref, target, weight))

    ctx = RankContext(rank, ws, None, "cpu", None, tuple(range(ws)))
    params = [x.clone().requires_grad_() for x in x0]
    side = FsdpSide(torch.optim.LBFGS, params, [{"params": params}], dict(LBFGS_HYPER), flavour, ctx)
    mine = [(side._local(p, t, r), side._local(p, w, r)) for p, t, w, r in zip(side.params, target, weight, side.ranges)]

    def closure():  # each rank its own elements' gradient (as FSDP's reduce-scatter leaves it)
        loss = torch.zeros(())
        for p, (t, w) in zip(side.params, mine):
            if t is None:
                continue  # fsdp1: none of this parameter's elements on this rank
            p.grad = 2 * w * (p.detach() - t)
            part = ((p.detach() - t) ** 2 * w).sum()
            loss = loss + (part.full_tensor() if flavour == "fsdp2" else part)  # fsdp1: the local part only
        return loss

    out = {"steps": []}
    for step in range(1, LBFGS_STEPS + 1):
        ref_opt.step(ref_closure)
        try:
            side.opt.step(closure)
        except Exception as e:  # noqa: BLE001 - a refusal is the finding
            out["error"] = f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return out
        worst = [0, 0.0]
        for got, want in zip(side.full_params(), ref):
            d = compare(got.detach(), want.detach())
            if d is not None and d.numeric:
                worst = [max(worst[0], d.max_ulp or 0), max(worst[1], d.max_rel_error or 0.0)]
        out["steps"].append(worst)
    return out


def lbfgs_row(kind: str, sizes: list[int]) -> dict:
    from optparity.harness.ranks import RankPool

    flavour = {"fsdp": "fsdp2", "fsdp1": "fsdp1"}[kind]
    got = {}
    for ws in sizes:
        pool = RankPool(ws, "gloo", timeout=300, start_method="fork")  # fork: the ranks know this script
        try:
            # uneven shards (5 rows over 2 or 3 ranks), and even ones (6 rows)
            got[ws] = {name: pool.run(lbfgs_on_shards, flavour, shapes, timeout=300)[0]
                       for name, shapes in (("uneven", [(5, 3), (6, 4), (7,)]), ("even", [(6, 3), (6, 4), (6,)]))}
        finally:
            pool.close()
    return got


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
    ap.add_argument("--lbfgs-only", action="store_true", help="only the LBFGS measurement")
    args = ap.parse_args()
    sizes = [int(w) for w in args.world_sizes.split(",")]
    algos = args.algorithms.split(",")
    out = {}
    for kind in args.kinds.split(","):
        out[f"{kind}/LBFGS"] = got = lbfgs_row(kind, sizes)
        print(f"| {kind} LBFGS | by hand | {json.dumps(got)} |", flush=True)
    if args.lbfgs_only:
        return
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
