"""The `optparity` command."""
from __future__ import annotations

import argparse
import sys

import torch

from optparity.harness import matrix
from optparity.harness.algorithms import ALGORITHMS

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in {', '.join(choices)}")
        return items
    return parse


def _all_candidates() -> list[tuple[str, str]]:
    """(candidate, reference) for every optparity form of every algorithm. Functional* classes
    reproduce torch.distributed.optim's functional optimizers, so those are their reference."""
    from optparity.harness.upstream import upstream_functional
    from optparity.harness.algorithms import SPECS

    out = []
    for algo, spec in SPECS.items():
        out += [(f"optparity.optim:{algo}", f"torch.optim:{algo}"),
                (f"optparity.functional:{algo.lower()}", f"torch.optim:{algo}")]
        if spec.functional_upstream:
            out.append((f"optparity.distributed:Functional{algo}", upstream_functional(algo)))
    return out


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="compare an optimizer with torch.optim bit for bit",
                       description="Run CANDIDATE and REFERENCE side by side over the case matrix and "
                                   "compare every parameter and state tensor after every step. "
                                   "Exit 0 only when every case is bit-identical.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidate", metavar="MODULE:NAME",
                      help="optimizer class, functional class (step(gradients)) or functional kernel")
    what.add_argument("--all", action="store_true",
                      help="check every optparity optimizer and kernel against torch.optim, and every "
                           "Functional* class against torch.distributed.optim's")
    p.add_argument("--reference", metavar="MODULE:NAME", help="default: torch.optim's class of the same name")
    p.add_argument("--algorithm", choices=ALGORITHMS, help="when the candidate's name does not say")
    p.add_argument("--paths", type=_csv(matrix.PATHS), default=list(matrix.PATHS))
    p.add_argument("--dtypes", type=_csv(list(_DTYPES)), default=["float32", "float64"])
    p.add_argument("--param-sets", type=_csv(matrix.PARAM_SETS), default=list(matrix.PARAM_SETS))
    p.add_argument("--steps", type=int, default=matrix.STEPS)
    p.add_argument("--fail-fast", action="store_true", help="stop at the first differing case")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads while checking (default 1)")
    p.add_argument("--json", metavar="FILE", help="write every case's result as JSON")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML for CI")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only, no progress")
    p.set_defaults(func=_run_check)


def _run_check(args) -> int:
    from optparity.harness.check import check
    from optparity.harness.report import format_text, write_json, write_junit

    if args.steps < 1:
        raise SystemExit("optparity check: --steps must be at least 1")
    candidates = _all_candidates() if args.all else [(args.candidate, args.reference)]
    reports = []
    for spec, reference in candidates:
        done = [0]

        def progress(result, _spec=spec):
            done[0] += 1
            if not args.quiet and sys.stderr.isatty():
                print(f"\r{_spec}: {done[0]} cases", end="", file=sys.stderr, flush=True)

        try:
            report = check(spec, reference, algorithm=args.algorithm, paths=args.paths,
                           dtypes=[_DTYPES[d] for d in args.dtypes], param_sets=args.param_sets,
                           steps=args.steps, fail_fast=args.fail_fast, threads=args.threads,
                           progress=progress)
        except (ValueError, TypeError) as e:
            print(f"optparity check: {e}", file=sys.stderr)
            return 2
        if not args.quiet and sys.stderr.isatty():
            print(file=sys.stderr)
        print(format_text(report))
        print()
        reports.append(report)
    if args.json:
        write_json(reports[0] if len(reports) == 1 else reports, args.json)
    if args.junit:
        write_junit(reports[0] if len(reports) == 1 else reports, args.junit)
    if len(reports) > 1:
        cases = sum(len(r.results) for r in reports)
        seconds = sum(r.seconds for r in reports)
        print(f"all: {len(reports)} candidates, {cases} cases, {sum(len(r.failed) for r in reports)} differ, "
              f"{seconds:.1f} s ({cases / max(seconds, 1e-9):.0f} cases/s)")
    return 0 if all(r.ok for r in reports) else 1


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="prove the harness: planted bugs are caught, torch is not flagged",
                       description="Check every mutant in optparity.harness.mutants (each must be caught) "
                                   "and torch.optim against itself (must pass). Exit 0 when both hold.")
    p.add_argument("--mutant", action="append", help="only these mutants (repeatable)")
    p.set_defaults(func=_run_selftest)


def _run_selftest(args) -> int:
    import pandas as pd

    from optparity.harness.check import check
    from optparity.harness.mutants import MUTANTS, by_name

    mutants = [by_name(n) for n in args.mutant] if args.mutant else list(MUTANTS)
    rows = []
    for m in mutants:
        report = check(m.build(), f"torch.optim:{m.algorithm}", algorithm=m.algorithm, fail_fast=True)
        first = report.first_failure
        rows.append({"mutant": m.name, "algorithm": m.algorithm, "kind": m.kind, "shows_under": m.shows_under,
                     "caught": first is not None, "cases_until_caught": len(report.results),
                     "first_divergence": f"{first.case.id} {first.message}"[:110] if first else "-"})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    alarms = []
    if not args.mutant:
        for algo in ALGORITHMS:
            report = check(f"torch.optim:{algo}", f"torch.optim:{algo}")
            if not report.ok:
                alarms.append(f"{algo}: {report.first_failure.message}")
        print(f"\ntorch.optim against itself: {'no false alarm' if not alarms else 'FALSE ALARMS: ' + '; '.join(alarms)}")
    caught = int(table["caught"].sum())
    print(f"{caught}/{len(table)} mutants caught")
    return 0 if caught == len(table) and not alarms else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optparity", description="optimizers proven bit for bit against torch.optim")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_check(sub)
    _add_selftest(sub)
    from optparity.bench.cli import add_parsers as add_bench_and_report_parsers
    add_bench_and_report_parsers(sub)  # `bench` and `report`, each setting func like _add_check
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
