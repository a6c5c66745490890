"""`optparity bench` and `optparity report`, registered by optparity.cli.build_parser."""
from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
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
                    "for each algorithm x implementation x workload x dtype, in this process: the implementations of "
                    "one algorithm/workload/dtype are timed in interleaved blocks, each block with the machine's "
                    "copy_ reference (docs/regression-tracking.md). Writes "
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
    p.add_argument("--quick", action="store_true",
                   help="short measurement budget per case (a smoke run: noisy, and its report claims nothing)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every group of cases this many times, alternating the order, and pool the "
                        "blocks (default 1; each round takes the budget's blocks again)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every measurement (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="reports", help="parent directory of the run directory (default: reports)")
    p.add_argument("--run-name", help="default: <UTC timestamp>-<short git sha>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--instructions", action="store_true",
                   help="also count instructions per step with valgrind's callgrind (deterministic; about 5-10 s "
                        "per 1M case plus 20 s, one valgrind run; exit 2 when valgrind is missing)")
    p.add_argument("--no-figures", action="store_true",
                   help="write the tables and headline but no PNG figures (faster, for CI)")
    p.add_argument("--baseline", metavar="RUN",
                   help="after measuring, compare with this earlier bench run (as `optparity report --compare RUN "
                        "NEW --remeasure`): suspects are measured again before anything is called; the verdict "
                        "heads the report and sets the exit code (1 = regression)")
    _add_rule_options(p)
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc malloc's thresholds alone (by default they are fixed so that step "
                        "temporaries are reused, not page-faulted in again; see workloads.steady_allocator)")
    p.set_defaults(func=run_bench)


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="rebuild a bench report, or compare two results and flag regressions",
        description="With RUN: rebuild summary.md, index.html and figures from RUN/samples.csv. With --compare "
                    "BASE NEW: test every normalised timing (optparity/torch on the same path, else time/copy_, "
                    "both measured in the same blocks) and every exact memory figure; print a headline and the "
                    "table, write an HTML diff page; exit 0 when nothing regressed, 1 when something did, 2 when "
                    "the results are missing, partial or malformed. BASE/NEW: bench run directories, samples.csv "
                    "files or asv result JSONs. The rule: docs/regression-tracking.md.")
    p.add_argument("run", nargs="?", help="a bench run directory to (re)build the report of")
    p.add_argument("--compare", nargs=2, metavar=("BASE", "NEW"))
    _add_rule_options(p)
    p.add_argument("--raw", action="store_true", help="compare seconds instead of the normalised figures")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="which time of each block to compare: the process's CPU time (default; on a shared machine "
                        "it leaves out the time slices other processes got) or the wall clock (on a GPU both are "
                        "CUDA event time)")
    p.add_argument("--remeasure", action="store_true",
                   help="measure NEW's suspects again with the optparity installed here (NEW must be a bench run "
                        "of this commit) and call a regression only when the fresh samples agree; they are "
                        "appended to NEW/samples.csv as a new pass")
    p.add_argument("--html", metavar="FILE",
                   help="the HTML diff page (default: NEW/compare.html when NEW is a bench run directory)")
    p.add_argument("--threshold", type=float, default=1.10,
                   help="asv results only (they hold no samples): slowdown factor NEW/BASE that counts as a "
                        "regression when the interquartile ranges do not overlap (default 1.10)")
    p.add_argument("--allow-missing", action="store_true",
                   help="compare what both have instead of failing when NEW lacks some of BASE's results")
    p.add_argument("--csv", metavar="FILE", help="also write the comparison table as CSV")
    p.set_defaults(func=run_report)


def _add_rule_options(p) -> None:
    from optparity.bench.thresholds import FDR, MIN_EFFECT

    p.add_argument("--min-effect", type=float, default=MIN_EFFECT,
                   help=f"smallest slowdown called a regression, as a fraction (default {MIN_EFFECT})")
    p.add_argument("--fdr", type=float, default=FDR,
                   help=f"Benjamini-Hochberg false discovery rate over the benchmarks (default {FDR})")


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


def _instruction_rows(cases, threads: int, device: str) -> list[dict]:
    """memory.csv rows of instructions per step (instructions.py: one callgrind run for all CPU cases)."""
    from optparity.bench import instructions
    from optparity.bench.workloads import WORKLOADS

    if device != "cpu" or not cases:
        return []
    print(f"counting instructions per step of {len(cases)} case(s) under callgrind ...", flush=True)
    started = time.monotonic()
    counted = instructions.count(cases, threads)
    print(f"counted in {time.monotonic() - started:.0f} s", flush=True)
    return [{"benchmark": c.benchmark, "algorithm": c.algorithm, "impl": c.impl, "workload": c.workload,
             "dtype": c.dtype, "numel": WORKLOADS[c.workload].numel, "metric": instructions.METRIC,
             "sample": 0, "bytes": counted[c.benchmark]} for c in cases if c.benchmark in counted]


def run_bench(args) -> int:
    import pandas as pd
    import torch

    from optparity.bench import measure
    from optparity.bench.progress import progress
    from optparity.bench.report import BLOCK_COLUMNS, META_JSON, MEMORY_CSV, SAMPLE_COLUMNS, SAMPLES_CSV, write_report

    if args.threads < 1 or args.rounds < 1:
        print("optparity bench: --threads and --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("optparity bench: --device cuda, but this machine has no usable CUDA device", file=sys.stderr)
        return 2
    from optparity.bench import compare, decide
    from optparity.bench.report import BASELINE_KEY, ReportError

    try:
        rule = decide.Rule(args.min_effect, args.fdr)
        if args.baseline:
            compare.load(args.baseline)  # a missing or broken baseline fails before the measuring
    except (ValueError, ReportError) as e:
        print(f"optparity bench: {e}", file=sys.stderr)
        return 2
    cases = measure.plan(args.algorithms, args.impls, args.workloads, args.dtypes, args.device)
    if not cases:
        print(f"optparity bench: nothing to measure: {','.join(args.impls)} does not exist for "
              f"{','.join(args.algorithms)} on {args.device}", file=sys.stderr)
        return 2
    if args.instructions and shutil.which("valgrind") is None:
        print("optparity bench: --instructions needs valgrind (apt-get install valgrind); perf counters: "
              "see docs/regression-tracking.md", file=sys.stderr)
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
    if args.instructions:
        from optparity.bench.instructions import Unavailable

        try:
            memory += _instruction_rows(cases, args.threads, args.device)
        except (Unavailable, subprocess.TimeoutExpired) as e:
            print(f"optparity bench: --instructions: {e}", file=sys.stderr)
            return 2
    samples = pd.DataFrame(timing)[[*SAMPLE_COLUMNS, *BLOCK_COLUMNS]].assign(run=name)
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
    code = 0
    if args.baseline:
        try:
            code, meta[BASELINE_KEY] = compare_runs(args.baseline, str(run_dir), rule=rule, remeasure=True)
        except ReportError as e:
            print(f"optparity bench: {e}", file=sys.stderr)
            return 2
        (run_dir / META_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        samples = pd.read_csv(run_dir / SAMPLES_CSV)
    files = write_report(run_dir, samples, mem, meta, figures=not args.no_figures)
    print(f"{len(cases)} cases, {len(samples)} samples -> {run_dir}")
    for f in [run_dir / SAMPLES_CSV, run_dir / MEMORY_CSV, *files]:
        print(f"  {f}")
    return code


def _remeasure(new, benchmarks: list[str], meta: dict, clock: str):
    """Measure `benchmarks` of the bench run `new` again (with the torch partner of each
    optparity path, its normaliser) as the next pass, append the rows to its samples.csv and
    return the reloaded result."""
    import pandas as pd

    from optparity.bench import compare, measure
    from optparity.bench.report import SAMPLES_CSV, ReportError

    if new.run_dir is None:
        raise ReportError(f"--remeasure needs NEW to be a bench run directory, got {new.name}")
    sha = _git_sha()
    if meta.get("git sha", "nogit") not in ("nogit", sha) and sha != "nogit":
        raise ReportError(f"--remeasure: {new.name} was measured at commit {meta['git sha']}, this optparity is "
                          f"{sha}; re-measure on NEW's commit")
    wanted: list[measure.Case] = []
    for name in benchmarks:
        algo, impl, workload, dtype = name.split("/")
        wanted.append(measure.Case(algo, impl, workload, dtype))
        library, path = impl.split("-")
        if library == "optparity":
            wanted.append(measure.Case(algo, f"torch-{path}", workload, dtype))
    cases = list(dict.fromkeys(wanted))
    threads = int(meta.get("threads (torch.set_num_threads)", 1))
    budget = measure.QUICK if str(meta.get("budget", "")).startswith("quick") else measure.FULL
    device = meta.get("device", "cpu")
    pass_no = int(new.samples["pass"].max()) + 1
    print(f"re-measuring {len(benchmarks)} suspect(s) ({len(cases)} cases with their torch references), "
          f"pass {pass_no} ...", flush=True)
    timing, _ = measure.run(cases, threads=threads, budget=budget, device=device, remeasure=pass_no)
    path = new.run_dir / SAMPLES_CSV
    old = pd.read_csv(path)
    rows = pd.DataFrame(timing).assign(run=old["run"].iloc[0] if "run" in old.columns else new.name)
    pd.concat([old, rows], ignore_index=True).to_csv(path, index=False)
    return compare.load(new.run_dir, clock)


def compare_runs(base_name: str, new_name: str, *, rule, raw: bool = False, clock: str = "cpu", remeasure: bool = False,
                 threshold: float = 1.10, html: str | None = None, allow_missing: bool = False,
                 csv: str | None = None) -> tuple[int, str]:
    """The comparison of `optparity report --compare` and `bench --baseline`: prints the headline
    and the table, writes the HTML page; (exit code, headline)."""
    from optparity.bench import compare, decide
    from optparity.bench.report import write_compare_page

    base, new = compare.load(base_name, clock), compare.load(new_name, clock)
    table = compare.compare(base, new, rule, raw=raw, threshold=threshold)
    if remeasure and base.stats is None:
        pending = table.index[table["verdict"].isin([decide.REGRESSION, decide.REMEASURE])
                              & (table["kind"] == "time")]
        if len(pending):
            new = _remeasure(new, list(pending), new.meta, clock)
            table = compare.compare(base, new, rule, raw=raw, threshold=threshold)
    code = compare.verdict(table, base_name, new_name, allow_missing)
    text = compare.headline(table, rule, compare.machine_ratio(base, new))
    figure = (f"{clock} seconds" if raw else
              f"normalised {clock} time (optparity/torch on the same path, else time/copy_)")
    rule_text = (f"rule: Mann-Whitney U of NEW/{1 + rule.min_effect:g} > BASE on {figure}, Benjamini-Hochberg at "
                 f"{rule.fdr:g}; suspects re-measured before a regression is called; memory exact"
                 + (f"; instructions per step (callgrind, deterministic) regress beyond {1 + rule.min_effect:g}x, "
                    "no test" if (table["kind"] == compare.INSTRUCTIONS).any() else "")
                 if base.stats is None else
                 f"rule (asv quantiles): NEW/BASE median > {threshold} and NEW's q1 > BASE's q3")
    print(f"NEW = {new_name}\nBASE = {base_name}\n{rule_text}\n")
    print(compare.format_table(table))
    print(f"\n{compare.counts(table)}\n\n{text}")
    if csv:
        table.to_csv(csv)
    page = Path(html) if html else (new.run_dir / "compare.html" if new.run_dir is not None else None)
    if page is not None:
        write_compare_page(page, text, table, base_name, new_name, rule_text)
        print(f"\n{page}")
    return code, text


def run_report(args) -> int:
    from optparity.bench import decide
    from optparity.bench.report import ReportError, load_run, write_report

    try:
        if args.compare:
            if args.run:
                raise ReportError("give either RUN or --compare BASE NEW, not both")
            try:
                rule = decide.Rule(args.min_effect, args.fdr)
            except ValueError as e:
                raise ReportError(f"--min-effect/--fdr: {e}") from None
            base_name, new_name = args.compare
            code, _ = compare_runs(base_name, new_name, rule=rule, raw=args.raw, clock=args.clock,
                                   remeasure=args.remeasure,
                                   threshold=args.threshold, html=args.html, allow_missing=args.allow_missing,
                                   csv=args.csv)
            return code
        if not args.run:
            raise ReportError("give a bench run directory, or --compare BASE NEW")
        samples, memory, meta = load_run(Path(args.run))
        for f in write_report(Path(args.run), samples, memory, meta):
            print(f)
        return 0
    except ReportError as e:
        print(f"optparity report: {e}", file=sys.stderr)
        return 2
