"""The `optparity` command."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from optparity.harness import matrix
from optparity.harness.algorithms import ALGORITHMS
from optparity.harness.levels import DTYPE_NAMES
from optparity.versions import MIRRORS_TORCH


def torch_version() -> str:
    import torch

    return torch.__version__



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
    reproduce torch.distributed.optim's functional optimizers, so those are their reference.
    A kernel that is its class's own kernel (the same function object) is left out: checking
    it would rerun the class's cases with the same code (_covered_kernels names them)."""
    from optparity.harness.upstream import upstream_functional
    from optparity.harness.algorithms import SPECS

    covered = dict(_covered_kernels())
    out = []
    for algo, spec in SPECS.items():
        out.append((f"optparity.optim:{algo}", f"torch.optim:{algo}"))
        if f"optparity.functional:{algo.lower()}" not in covered:
            out.append((f"optparity.functional:{algo.lower()}", f"torch.optim:{algo}"))
        if spec.functional_upstream:
            out.append((f"optparity.distributed:Functional{algo}", upstream_functional(algo)))
    return out


def _covered_kernels() -> list[tuple[str, str]]:
    """(kernel, class) where optparity.optim's class steps with exactly that optparity.functional
    kernel: `check --candidate` of the kernel runs the class with the kernel swapped in, i.e. the
    same code, so the class's check covers it."""
    from optparity.harness.algorithms import SPECS

    return [(f"optparity.functional:{algo.lower()}", f"optparity.optim:{algo}") for algo, spec in SPECS.items()
            if getattr(spec.optparity_class(), "kernel", None) is spec.optparity_kernel()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _hyper(text: str) -> tuple[str, object]:
    import ast

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a Python literal (e.g. 0.01, True, (0.9,0.99))") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no timeout) or more, got {text}")
    return value


_COLUMNS_HELP = """summary columns (one row per algorithm, path, dtype; counts of cases):
  cases        cases run
  identical    bit-identical: every parameter and state tensor has torch's bits after every step
  tolerated    within --max-ulp (tolerance mode only)
  numerics     numbers differ; the summary says whether as rounding does ("rounding-level": the
               candidate is within 4x torch's own error against a float64 shadow of torch's
               reference) or not ("different math")
  api          only API/layout differs (state keys, param-group keys, state_dict layout); numbers match
  n/a          not applicable: the candidate does not take an option of the case (named below)
  same_error   both sides raised the same error (torch's contract; proves no numbers)
  error        one side raised, or the two raised different errors
  hung         no result within --timeout
  measured     across devices: distance measured, not claimed zero (--reference-device)
  worst_ulp    largest distance in units in the last place between candidate and torch over every
               tensor and step ("huge (>2^53)": a sign flip or a value near zero; exact in --json)
  fused_vs_forloop_ulp
               fused cases only, informational: the candidate's largest ULP distance from torch's
               for-loop path on the same case (torch's fused kernels are not bit-equal to its
               for-loop path by design; on gapped views torch's fused CPU kernel is wrong: a candidate
               copying it reads huge there, a correct one 0, and the case says "reference suspect")
then "by cause" names what the failing cases share (an option, parameter set, dtype or path)."""


def _add_check(sub) -> None:
    from optparity.harness.check import DEFAULT_TIMEOUT, default_workers
    from optparity.harness.levels import LEVELS

    p = sub.add_parser(
        "check", help="compare an optimizer with torch.optim bit for bit",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run CANDIDATE and REFERENCE side by side over the case matrix and compare every "
                    "parameter and state tensor after every step.",
        epilog="levels:\n" + "\n".join(f"  {name:8} {lv.summary}" for name, lv in LEVELS.items())
               + "\n\nalgorithms: " + ", ".join(ALGORITHMS)
               + "\n\ndevices: --device cuda[:N] runs the same matrix with parameters, gradients and state there, "
                 "against torch's CUDA paths (for-loop, foreach, fused where torch has it, and torch's CUDA-only "
                 "capturable configurations); ids of cases off the CPU end in @DEVICE. --reference-device DEV "
                 "runs the reference elsewhere: such cases are not claimed bit-identical, their distance (max ULP, "
                 "abs and rel error, measured on the CPU) is reported as 'measured across devices'."
               + "\n\n" + _COLUMNS_HELP
               + "\n\nexit codes: 0 every case bit-identical (or, with --reference-device, measured across devices: "
                 "a distance fails only beyond --max-ulp, a NaN/inf mismatch only when --max-ulp is given); 1 a case "
                 "differs, hung or crashed; 2 usage, import or output-path error, or a device this machine lacks "
                 "(before any case runs); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), "
                 "each after the partial summary and reports")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidate", metavar="MODULE:NAME",
                      help="optimizer class, functional class (step(gradients)) or functional kernel; "
                           "MODULE.NAME works too")
    what.add_argument("--all", action="store_true",
                      help="check every optparity optimizer and kernel against torch.optim, and every "
                           "Functional* class against torch.distributed.optim's")
    p.add_argument("--reference", metavar="MODULE:NAME", help="default: torch.optim's class of the same name")
    p.add_argument("--algorithm", choices=ALGORITHMS, metavar="NAME",
                   help="when the candidate's name does not say: " + ", ".join(ALGORITHMS))
    p.add_argument("--level", choices=list(LEVELS), default="default",
                   help="which cases: quick (a pull-request gate), default, full (nightly); see below")
    p.add_argument("--paths", type=_csv(matrix.PATHS), help=f"only these ({', '.join(matrix.PATHS)})")
    p.add_argument("--dtypes", type=_csv(list(DTYPE_NAMES)),
                   help="instead of the level's (default: float32,float64); complex64 / complex128 select the "
                        "complex parameter set at float32 / float64")
    p.add_argument("--param-sets", type=_csv(matrix.PARAM_SETS), help=f"only these ({', '.join(matrix.PARAM_SETS)})")
    p.add_argument("--steps", type=_positive_int, help=f"steps per case (default {matrix.STEPS}; an algorithm's description may say fewer: LBFGS 9)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first differing case")
    p.add_argument("-n", "--workers", type=_positive_int, default=default_workers(), metavar="N",
                   help="worker processes (default: this machine's cores, here %(default)s); 1 runs in "
                        "this process unless --timeout needs a watched one")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help="seconds per case before it is reported as hung and its worker replaced "
                        "(default %(default)g; 0: none, and -n 1 then runs in this process)")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads per worker (default 1)")
    p.add_argument("--json", metavar="FILE", help="write every case's result as JSON (rewritten as results come in)")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML for CI (rewritten as results come in)")
    p.add_argument("-q", "--quiet", action="store_true", help="summary only, no progress")
    p.add_argument("--hyper", action="append", type=_hyper, default=[], metavar="KEY=VALUE",
                   help="pin a hyperparameter on both sides over every configuration (repeatable; VALUE is a "
                        "Python literal: --hyper lr=0.01 --hyper betas=(0.9,0.99))")
    p.add_argument("--numerics-only", action="store_true",
                   help="compare parameters and state values only: state-key, param-group and state_dict "
                        "layout differences are reported but do not fail")
    p.add_argument("--filter", dest="case_filter", metavar="TEXT",
                   help="only cases whose id contains TEXT or matches it as a regular expression")
    p.add_argument("--max-ulp", type=_non_negative_int, metavar="N",
                   help="tolerance mode: numeric differences of at most N ULPs pass as 'within tolerance' "
                        "(reported as such; default: bit for bit)")
    p.add_argument("--device", metavar="DEV", default=None,
                   help="where the candidate's parameters, gradients and state live: cpu (default), cuda, cuda:N; "
                        "the reference runs there too unless --reference-device says otherwise")
    p.add_argument("--reference-device", metavar="DEV", default=None,
                   help="run the reference on DEV instead (e.g. --device cuda --reference-device cpu): distances "
                        "are measured and reported, not claimed zero (see exit codes)")
    p.add_argument("--html", metavar="DIR", help="write an HTML report (grid by verdict, error plots) into DIR")
    p.add_argument("--golden", nargs="?", const="", metavar="DIR",
                   help="check against recorded fingerprints in DIR (default reference/golden) instead of running "
                        "the reference; exit 2 when they cannot be compared (harness/golden.py)")
    from optparity.harness.distributed.cli import add_arguments as add_distributed_arguments
    add_distributed_arguments(p)  # --kind, --world-sizes, --backend (docs/distributed-check.md)
    p.set_defaults(func=_run_check)


class _Progress:
    """Case counts and names on stderr: one rewritten line on a terminal, a plain line every
    EVERY cases otherwise (CI logs)."""

    EVERY = 250

    def __init__(self, label: str, total: int, quiet: bool):
        self.label, self.total, self.quiet = label, total, quiet
        self.tty = sys.stderr.isatty()
        self.done, self.start, self.shown = 0, time.monotonic(), False

    def __call__(self, result) -> None:
        self.done += 1
        if self.quiet:
            return
        if _is_hung(result):
            self.clear()
            print(f"{self.label}: {result.case.id}: {result.message}", file=sys.stderr, flush=True)
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            print(f"\r\x1b[K{self.label}: {self.done}/{self.total} {result.case.id}"[:width + 4], end="",
                  file=sys.stderr, flush=True)
            self.shown = True
        elif self.done % self.EVERY == 0:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            print(f"{self.label}: {self.done}/{self.total} cases ({rate:.0f} cases/s)", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.shown:
            print("\r\x1b[K", end="", file=sys.stderr, flush=True)
            self.shown = False


def _is_hung(result) -> bool:
    return result.verdict == "hung" or result.message.startswith("the worker process running this case died")


class _Outputs:
    """--json / --junit, rewritten atomically (temp file + os.replace) as results come in, so a
    killed run leaves a valid partial report."""

    def __init__(self, json_path: str | None, junit_path: str | None):
        self.paths = [(p, w) for p, w in ((json_path, "json"), (junit_path, "junit")) if p]
        self.last, self.interval = 0.0, 1.0

    @staticmethod
    def unwritable(args) -> str | None:
        """Why one of the reports --json, --junit, --html asks for cannot be written, or None."""
        wanted = [("--json", args.json), ("--junit", args.junit)]
        if args.html:
            wanted.append(("--html", str(Path(args.html) / "index.html")))
        return next((why for flag, path in wanted if path and (why := _Outputs.check_writable(flag, path))), None)

    @staticmethod
    def check_writable(flag: str, path: str) -> str | None:
        """Why `path` cannot be written, or None. Missing directories are created only below the
        working directory (reports/check/all.json in a fresh checkout); elsewhere they must exist."""
        target = Path(path).absolute()
        if target.is_dir():
            return f"{flag} {path}: is a directory"
        parent = target.parent
        if not parent.is_dir():
            if parent.exists():
                return f"{flag} {path}: {parent} is not a directory"
            if not parent.is_relative_to(Path.cwd()):
                return f"{flag} {path}: directory {parent} does not exist"
            try:
                parent.mkdir(parents=True)
            except OSError as e:
                return f"{flag} {path}: cannot create directory {parent}: {e.strerror or e}"
        try:
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as e:
            return f"{flag} {path}: cannot write in {parent}: {e.strerror or e}"
        if target.exists() and not os.access(target, os.W_OK):
            return f"{flag} {path}: not writable"
        return None

    def update(self, reports, force: bool = False) -> None:
        now = time.monotonic()
        if not self.paths or not reports or (not force and now - self.last < self.interval):
            return
        from optparity.harness.report import write_json, write_junit

        doc = reports[0] if len(reports) == 1 else list(reports)
        for path, kind in self.paths:
            target = Path(path)
            partial = target.with_name(f".{target.name}.partial")
            (write_json if kind == "json" else write_junit)(doc, partial)
            os.replace(partial, target)
        # Large reports take a while to write, on a core the workers need: never spend more than
        # a tenth of the run on it.
        self.last = time.monotonic()
        self.interval = max(1.0, 10 * (self.last - now))


def _print_tracebacks(report) -> None:
    """The candidate's own traceback for the first error of each kind (exception type), in the
    cases that fail (an error both sides raise is torch's contract, not news)."""
    seen = set()
    for r in report.results:
        tb = getattr(r, "traceback", None)
        if not tb or r.status != "fail":
            continue
        kind = tb.strip().splitlines()[-1].split(":")[0]
        if kind in seen:
            continue
        seen.add(kind)
        print(f"\ntraceback, first {kind} ({r.case.id}):\n{tb.rstrip()}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job's timeout, kill): stopped as cleanly as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _run_check(args) -> int:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _check_command(args)
    except KeyboardInterrupt as e:  # before or between the cases: nothing ran, nothing to report
        print(f"optparity check: {_stopped_by(e)} before any case ran", file=sys.stderr)
        return _stop_code(e)


def _stopped_by(e: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted (Ctrl-C)"


def _stop_code(e: BaseException) -> int:
    return 143 if isinstance(e, _Terminated) else 130


def _check_command(args) -> int:
    from optparity.harness.check import NoCases, UsageError, prepare, run
    from optparity.harness.report import format_text

    def usage(message: str) -> int:
        print(f"optparity check: {message}", file=sys.stderr)
        return 2

    from optparity.harness.distributed.cli import is_distributed, run_distributed_check
    if is_distributed(args):  # --kind / --world-sizes / --backend: the check over N ranks
        return run_distributed_check(args, usage)
    pairs = _all_candidates() if args.all else [(args.candidate, args.reference)]
    devices = {"--device": args.device, "--reference-device": args.reference_device}
    if args.golden is not None and any(d not in (None, "cpu") for d in devices.values()):
        flag = next(f for f, d in devices.items() if d not in (None, "cpu"))
        return usage(f"--golden with {flag} {devices[flag]}: the recorded fingerprints are of CPU runs")
    if args.golden is not None:
        from optparity.harness.golden import refuse_with_golden, run_golden_check
        return refuse_with_golden(args) or run_golden_check(args, pairs)
    options = dict(algorithm=args.algorithm, level=args.level, paths=args.paths,
                   dtypes=[DTYPE_NAMES[d] for d in args.dtypes] if args.dtypes else None,
                   param_sets=args.param_sets, steps=args.steps, hyper=dict(args.hyper),
                   numerics_only=args.numerics_only, max_ulp=args.max_ulp, case_filter=args.case_filter,
                   device=args.device, reference_device=args.reference_device)
    plans, no_cases = [], []
    try:
        for spec, reference in pairs:
            try:
                plans.append(prepare(spec, reference, **options))
            except NoCases as e:
                if not args.all:
                    raise
                no_cases.append(f"{spec} ({e})")
    except UsageError as e:
        return usage(str(e))
    if not plans:
        return usage("no case to run for any candidate with these options")
    why = _Outputs.unwritable(args)
    if why:
        return usage(why)
    outputs = _Outputs(args.json, args.junit)
    reports, progress = [], None
    try:
        for plan in plans:
            report = plan.new_report()
            reports.append(report)
            progress = _Progress(plan.candidate.label, len(plan.cases), args.quiet)
            for note in getattr(plan, "notes", ()):
                print(f"{plan.candidate.label}: {note}")

            def on_result(result, _progress=progress):
                _progress(result)
                outputs.update(reports)

            run(plan, fail_fast=args.fail_fast, threads=args.threads, workers=args.workers,
                timeout=args.timeout, progress=on_result, report=report)
            progress.clear()
            print(format_text(report))
            _print_tracebacks(report)
            print()
            outputs.update(reports, force=True)
    except KeyboardInterrupt as e:
        if progress is not None:
            progress.clear()
        report = reports[-1] if reports else None
        if report is not None:
            print(format_text(report))
            _print_tracebacks(report)
        done = sum(len(r.results) for r in reports)
        print(f"\n{_stopped_by(e)}: partial results, {done} of {sum(len(p.cases) for p in plans)} cases ran"
              + (f"; written to {', '.join(p for p, _ in outputs.paths)}" if outputs.paths else ""))
        outputs.update(reports, force=True)
        return _stop_code(e)
    if args.html:
        from optparity.harness.html import write_html

        print(f"HTML report: {write_html(reports, args.html)}")
    if no_cases:
        print("no case to run for: " + "; ".join(no_cases))
    if len(reports) > 1:
        cases = sum(len(r.results) for r in reports)
        seconds = sum(r.seconds for r in reports)
        print(f"all: {len(reports)} candidates, {cases} cases, {sum(len(r.failed) for r in reports)} differ, "
              f"{seconds:.1f} s ({cases / max(seconds, 1e-9):.0f} cases/s)")
    if len(reports) > 1:
        from optparity.harness.report import version_drift_line

        drifts = [line for r in reports if (line := version_drift_line(r))]
        if drifts:
            print(f"version drift: {len(drifts)} of optparity's implementations differ from torch "
                  f"{torch_version()} (they mirror {MIRRORS_TORCH}):\n  " + "\n  ".join(drifts))
    if args.all and (covered := _covered_kernels()):
        print(f"{len(covered)} kernels not rerun, covered by their class's check (its kernel is the same "
              f"function): " + ", ".join(k.split(":")[1] for k, _ in covered))
    from optparity.harness.report import exit_reason

    code = 0 if all(r.ok for r in reports) else 1
    reasons = [exit_reason(r) for r in reports]
    if len(reports) == 1:
        print(reasons[0])
    else:
        failing = [f"{r.candidate}: {why}" for r, why in zip(reports, reasons) if not r.ok]
        print(f"exit {code}: " + ("every candidate's cases match" if not failing else "; ".join(failing)))
    return code


def _add_selftest(sub) -> None:
    p = sub.add_parser("selftest", help="prove the harness: planted bugs are caught, torch is not flagged",
                       description="Check every mutant in optparity.harness.mutants (each must be caught) "
                                   "and torch.optim against itself (must pass). Exit 0 when both hold.")
    p.add_argument("--mutant", action="append", help="only these mutants (repeatable)")
    from optparity.harness.check import default_workers
    from optparity.harness.levels import LEVELS

    p.add_argument("--level", choices=list(LEVELS), default="default", help="the cases each mutant meets (default: default)")
    p.add_argument("-n", "--workers", type=_positive_int, default=default_workers(), metavar="N",
                   help="worker processes per check (default: this machine's cores, here %(default)s)")
    p.set_defaults(func=_run_selftest)


def _run_selftest(args) -> int:
    import pandas as pd

    from optparity.harness.check import check
    from optparity.harness.mutants import MUTANTS, by_name

    from optparity.harness.distributed import selftest as distributed

    wanted_distributed = [n for n in args.mutant or () if n in distributed.names()]
    mutants = ([by_name(n) for n in args.mutant if n not in wanted_distributed] if args.mutant
               else list(MUTANTS))
    rows = []
    for m in mutants:
        report = check(m.build(), f"torch.optim:{m.algorithm}", algorithm=m.algorithm, fail_fast=True,
                       level=args.level, workers=args.workers)
        first = report.first_failure
        # edge mutants (harness/mutants.py) must be caught under their own condition
        exposed = getattr(m, "exposed", None)
        rows.append({"mutant": m.name, "algorithm": m.algorithm, "kind": m.kind, "shows_under": m.shows_under,
                     "axis": m.kind if exposed else "base",
                     "caught": first is not None and (exposed is None or exposed(first.case)),
                     "cases_until_caught": len(report.results),
                     "first_divergence": f"{first.case.id} {first.message}"[:110] if first else "-"})
    if not args.mutant or wanted_distributed:  # planted distributed bugs, at the distributed quick level
        rows += distributed.mutant_rows(wanted_distributed or None)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    per_axis = table.groupby("axis", sort=False)["caught"].agg(caught="sum", mutants="count")
    print("\nper axis:\n" + per_axis.to_string())
    alarms = []
    if not args.mutant:
        for algo in ALGORITHMS:
            report = check(f"torch.optim:{algo}", f"torch.optim:{algo}", level=args.level, workers=args.workers)
            if not report.ok:
                alarms.append(f"{algo}: {report.first_failure.message}")
        print(f"\ntorch.optim against itself: {'no false alarm' if not alarms else 'FALSE ALARMS: ' + '; '.join(alarms)}")
        torch_distributed = distributed.torch_alarms()
        print("torch's distributed classes (ZeRO, PostLocalSGDOptimizer, averagers): "
              + ("no false alarm" if not torch_distributed else "FALSE ALARMS: " + "; ".join(torch_distributed)))
        alarms += torch_distributed
    caught = int(table["caught"].sum())
    print(f"{caught}/{len(table)} mutants caught")
    return 0 if caught == len(table) and not alarms else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optparity", description="optimizers proven bit for bit against torch.optim")
    from optparity import __version__
    from optparity.versions import compared_against

    parser.add_argument("--version", action="version",
                        version=f"optparity {__version__}; checks against {compared_against()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_check(sub)
    _add_selftest(sub)
    from optparity.harness import characterize, golden
    golden.add_parsers(sub, _csv, _positive_int)  # `reference record` / `reference check`
    characterize.add_parser(sub, _csv, _positive_int)  # `characterize`
    from optparity.bench.cli import add_parsers as add_bench_and_report_parsers
    add_bench_and_report_parsers(sub)  # `bench` and `report`, each setting func like _add_check
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `--candidate myopt:MyAdamW` from the folder holding myopt.py, as `python -m` would import it
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
