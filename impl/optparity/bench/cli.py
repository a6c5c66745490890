"""`optparity bench` and `optparity report`, registered by optparity.cli.build_parser."""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

from optparity.bench.workloads import ALGORITHMS, DTYPES, IMPLS, WORKLOADS, steady_allocator


def add_parsers(sub) -> None:
    add_bench_parser(sub)
    add_report_parser(sub)


def _csv(choices):
    from optparity.cli import _csv as parse_list  # one list syntax for every subcommand

    return parse_list(list(choices))


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="time optimizer steps, optparity vs torch, and write a report",
        description="Measure step latency (torch.utils.benchmark), optimizer-state bytes and step temporaries "
                    "for each algorithm x implementation x workload x dtype, in this process. Writes "
                    "reports/<run-name>/: samples.csv (one row per sample), memory.csv, run.json, summary.md, "
                    "index.html and PNG figures.")
    p.add_argument("--algorithms", type=_csv(ALGORITHMS), default=list(ALGORITHMS), metavar="LIST",
                   help=f"comma-separated, from {','.join(ALGORITHMS)} (default: all)")
    p.add_argument("--impls", type=_csv(IMPLS), default=list(IMPLS), metavar="LIST",
                   help=f"comma-separated, from {','.join(IMPLS)} (default: all; fused only where torch has it)")
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS), metavar="LIST",
                   help="; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()))
    p.add_argument("--dtypes", type=_csv(DTYPES), default=list(DTYPES), metavar="LIST",
                   help=f"comma-separated, from {','.join(DTYPES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="short measurement budget per case (a smoke run; noisy)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every case this many times, alternating the order, and pool the samples "
                        "(default 1; use 3 or more for numbers you publish)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="reports", help="parent directory of the run directory (default: reports)")
    p.add_argument("--run-name", help="default: <UTC timestamp>-<short git sha>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's thresholds alone (by default they are fixed so that step "
                        "temporaries are reused, not page-faulted in again; see workloads.steady_allocator)")
    p.set_defaults(func=run_bench)


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="rebuild a bench report, or compare two results and flag regressions",
        description="With RUN: rebuild summary.md, index.html and figures from RUN/samples.csv. With --compare "
                    "BASE NEW: print per-benchmark NEW/BASE ratios; exit 1 when a benchmark is slower by more "
                    "than --threshold and its interquartile range does not overlap BASE's, 2 when the results "
                    "are missing, partial or malformed. BASE/NEW: bench run directories, samples.csv files or "
                    "asv result JSONs.")
    p.add_argument("run", nargs="?", help="a bench run directory to (re)build the report of")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"))
    p.add_argument("--threshold", type=float, default=1.10,
                   help="slowdown factor NEW/BASE that counts as a regression (default 1.10)")
    p.add_argument("--allow-missing", action="store_true",
                   help="compare what both have instead of failing when NEW lacks some of BASE's results")
    p.add_argument("--csv", metavar="FILE", help="also write the comparison table as CSV")
    p.set_defaults(func=run_report)


def _git_sha() -> str:
    """The commit of the optparity being measured (its source tree, not the current directory)."""
    import optparity

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(optparity.__file__).parent)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "nogit"
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(args) -> int:
    import pandas as pd
    import torch

    from optparity.bench import measure
    from optparity.bench.progress import progress
    from optparity.bench.report import META_JSON, MEMORY_CSV, SAMPLES_CSV, write_report

    if args.threads < 1 or args.rounds < 1:
        print("optparity bench: --threads and --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("optparity bench: --device cuda, but this machine has no usable CUDA device", file=sys.stderr)
        return 2
    cases = measure.plan(args.algorithms, args.impls, args.workloads, args.dtypes, args.device)
    if not cases:
        print(f"optparity bench: nothing to measure: {','.join(args.impls)} does not exist for "
              f"{','.join(args.algorithms)} on {args.device}", file=sys.stderr)
        return 2
    sha = _git_sha()
    now = datetime.datetime.now(datetime.timezone.utc)
    name = args.run_name or f"{now:%Y%m%d-%H%M%S}-{sha}"
    run_dir = Path(args.out) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"optparity bench: {run_dir} already exists and is not empty; choose another --run-name",
              file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    budget = measure.QUICK if args.quick else measure.FULL
    allocator = "system default (--system-malloc)" if args.system_malloc else steady_allocator()
    with progress(len(cases) * args.rounds, "optparity bench", enabled=not args.no_progress) as advance:
        timing, memory = measure.run(cases, threads=args.threads, budget=budget, device=args.device,
                                     rounds=args.rounds, advance=advance)
    samples = pd.DataFrame(timing).assign(run=name)
    mem = pd.DataFrame(memory).assign(run=name)
    samples.to_csv(run_dir / SAMPLES_CSV, index=False)
    mem.to_csv(run_dir / MEMORY_CSV, index=False)
    meta = {"run": name, "date (UTC)": now.isoformat(timespec="seconds"), "git sha": sha,
            "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_model(),
            "device": args.device, "threads (torch.set_num_threads)": args.threads,
            "budget": f"{'quick' if args.quick else 'full'}: {budget}", "rounds": args.rounds,
            "allocator": allocator,
            "command": " ".join(["optparity"] + sys.argv[1:])}
    (run_dir / META_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    files = write_report(run_dir, samples, mem, meta)
    print(f"{len(cases)} cases, {len(samples)} samples -> {run_dir}")
    for f in [run_dir / SAMPLES_CSV, run_dir / MEMORY_CSV, *files]:
        print(f"  {f}")
    return 0


def run_report(args) -> int:
    from optparity.bench import compare
    from optparity.bench.report import ReportError, load_run, write_report

    try:
        if args.compare:
            if args.run:
                raise ReportError("give either RUN or --compare BASE NEW, not both")
            base_name, new_name = args.compare
            table = compare.compare(compare.load(base_name), compare.load(new_name), args.threshold)
            print(f"NEW = {new_name}\nBASE = {base_name}\nratio = NEW/BASE median; SLOWER when ratio > "
                  f"{args.threshold} and NEW's q1 > BASE's q3\n")
            print(compare.format_table(table))
            if args.csv:
                table.to_csv(args.csv)
            slower = int((table["status"] == "SLOWER").sum())
            print(f"\n{slower} slower, {int((table['status'] == 'faster').sum())} faster, "
                  f"{int((table['status'] == 'same within noise').sum())} same within noise")
            return compare.verdict(table, base_name, new_name, args.allow_missing)
        if not args.run:
            raise ReportError("give a bench run directory, or --compare BASE NEW")
        samples, memory, meta = load_run(Path(args.run))
        for f in write_report(Path(args.run), samples, memory, meta):
            print(f)
        return 0
    except ReportError as e:
        print(f"optparity report: {e}", file=sys.stderr)
        return 2
