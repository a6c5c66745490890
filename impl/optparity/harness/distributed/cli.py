"""`optparity check --kind KIND --world-sizes 2,3 [--backend gloo|nccl]`: the distributed check's
part of the command line (the rest of `check`'s options are cli.py's, read here where they apply)."""
from __future__ import annotations

import argparse
import os
import sys

KIND_NAMES = "zero, local-sgd, fsdp, fsdp1, adapter"


def _world_sizes(text: str) -> list[int]:
    sizes = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected world sizes like 2,3 got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"a world size must be at least 1, got {value}")
        sizes.append(value)
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed check (docs/distributed-check.md)")
    g.add_argument("--kind", metavar="KIND",
                   help=f"check a distributed optimizer over several ranks: {KIND_NAMES} (default with "
                        f"--world-sizes: told from the candidate's signature)")
    g.add_argument("--world-sizes", type=_world_sizes, metavar="N[,N...]",
                   help="world sizes to run every distributed case at (default 2,3; under torchrun: the job's)")
    g.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend (default gloo; nccl needs one CUDA device per rank)")


def is_distributed(args) -> bool:
    return any(getattr(args, k, None) is not None for k in ("kind", "world_sizes", "backend"))


def _refused(args) -> str | None:
    """Options of the single-process check that mean nothing over ranks."""
    if args.all:
        return "--all checks optparity's own single-process optimizers; give --candidate with --kind"
    for flag, value in (("--golden", args.golden), ("--device", args.device),
                        ("--reference-device", args.reference_device)):
        if value is not None:
            return f"{flag} does not apply to a distributed check (the ranks' devices follow --backend)"
    return None


def _leader() -> bool:
    """Under torchrun only rank 0 prints and writes reports."""
    return os.environ.get("RANK", "0") == "0"


def run_distributed_check(args, usage) -> int:
    from optparity.cli import _Outputs, _print_tracebacks, _Progress
    from optparity.harness.check import UsageError
    from optparity.harness.distributed.engine import prepare, run
    from optparity.harness.levels import DTYPE_NAMES
    from optparity.harness.report import format_text

    why = _refused(args)
    if why:
        return usage(why)
    try:
        plan = prepare(args.candidate, args.reference, kind=args.kind, world_sizes=args.world_sizes,
                       backend=args.backend, algorithm=args.algorithm, level=args.level,
                       dtypes=[DTYPE_NAMES[d] for d in args.dtypes] if args.dtypes else None, paths=args.paths,
                       param_sets=args.param_sets, steps=args.steps, case_filter=args.case_filter,
                       hyper=dict(args.hyper), numerics_only=args.numerics_only, max_ulp=args.max_ulp)
    except UsageError as e:
        return usage(str(e))
    why = _Outputs.unwritable(args)
    if why:
        return usage(why)
    leader = _leader()
    outputs = _Outputs(args.json if leader else None, args.junit if leader else None)
    report = plan.new_report()
    sizes = ",".join(map(str, plan.world_sizes))
    progress = _Progress(f"{plan.label} [{plan.kind}, world sizes {sizes}]", len(plan.cases), args.quiet or not leader)

    def on_result(result):
        progress(result)
        outputs.update([report])

    try:
        run(plan, fail_fast=args.fail_fast, timeout=args.timeout or None, progress=on_result, report=report)
    except KeyboardInterrupt:
        progress.clear()
        if leader:
            print(format_text(report))
            print(f"\ninterrupted: partial results, {len(report.results)} of {len(plan.cases)} cases ran")
        outputs.update([report], force=True)
        return 130
    progress.clear()
    if leader:
        print(f"kind: {plan.kind}, world sizes {sizes}, backend {plan.backend}")
        print(format_text(report))
        _print_tracebacks(report)
        outputs.update([report], force=True)
        if args.html:
            from optparity.harness.html import write_html

            print(f"HTML report: {write_html([report], args.html)}")
    sys.stdout.flush()
    return 0 if report.ok else 1
