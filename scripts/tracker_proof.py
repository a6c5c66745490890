"""Benchmark of the regression tracker itself: does `optparity bench --baseline` stay quiet on an
unchanged commit and catch planted regressions, every time and only where they are?

    .venv/bin/python scripts/tracker_proof.py --reps 5   (about 8-12 min on a 2-core box; about 20 min more
                                                          with the instruction counts)

Per repetition, five bench runs of the same small matrix (Adam and SGD, optparity and torch,
forloop and foreach, 1M float32), each compared with the first the way a CI does it:
`optparity bench ... --no-figures` then, in a fresh process, `optparity report --compare BASE NEW
--remeasure` (suspects measured again before anything is called):
  base       the reference run
  aa         the same commit again                                  -> must report 0 regressions
  aa-load    the same commit while a busy loop loads one core        -> must report 0 regressions
  slow5+mem  Adam optparity-foreach steps 5 % slower, and Adam optparity-forloop holds one extra
             state-sized temporary through its step                 -> both caught, nothing else; the memory
                                                                       by exactly the temporary's bytes
  slow20     Adam optparity-foreach 20 % slower                      -> caught there, nowhere else
With --instructions (the default where valgrind is installed) every bench run also counts the
instructions per step of its 4 optparity cases (8 with --count-torch) under callgrind
(`bench --instructions`; about 45 s a run here, 75 s with torch's), so each comparison
also decides on a deterministic figure: the target's count must rise beyond 3 % in both slowdowns
and no other count may. The plants exist only in this script's child processes: a subclass of
optparity's Adam swapped in for optparity.bench.workloads.optimizer_class, in the callgrind child
too (instructions.child_argv runs this script with --ir-child); shipped code has no hook for them.
The slowdown is extra `mul_(1.0)` passes over k elements of each parameter (whole passes, then the first elements),
k calibrated at the start so they cost 5 % (20 %) of the step's CPU time; the realised size is
reported as measured.

Writes OUT/results.csv (one row per run and figure: timing, memory, instructions; its verdict),
OUT/runs.csv, OUT/summary.md (false alarms and detections by each kind of figure; the load)
and OUT/pages/ (the compare pages of the first repetition).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "Adam/optparity-foreach/1M/float32"
TARGET_INSTRUCTIONS = f"{TARGET} [instructions_per_step]"
MEMORY_TARGETS = ("Adam/optparity-forloop/1M/float32 [step_peak_bytes]",
                  "Adam/optparity-forloop/1M/float32 [step_alloc_bytes]")
MATRIX = ["--algorithms", "Adam,SGD", "--impls", "optparity-foreach,optparity-forloop,torch-foreach,torch-forloop",
          "--workloads", "1M", "--dtypes", "float32"]
SCENARIOS = ("aa", "aa-load", "slow5+mem", "slow20")
BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


# ---------------------------------------------------------------- child: one bench run with a plant

_ONES: dict = {}


def _planted(cls, extra_elements: int, extra_temporary: bool):
    import torch

    class Planted(cls):
        """optparity's optimizer with the experiment's regression, on the foreach path only."""

        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            if not self.defaults.get("foreach"):  # the memory plant lives on the forloop path
                held = [torch.empty_like(p) for p in params] if extra_temporary else None
                loss = super().step(closure)
                del held
                return loss
            loss = super().step(closure)
            with torch.no_grad():
                for p in params:  # extra_elements may span several whole passes
                    # a cached 0-dim tensor: mul_(1.0) would wrap the Python scalar into a fresh
                    # tensor each call, 4 bytes the exact memory figures report (they did: +12 bytes)
                    if p.dtype not in _ONES:
                        _ONES[p.dtype] = torch.ones((), dtype=p.dtype, device=p.device)
                    one = _ONES[p.dtype]
                    left = extra_elements
                    while left > 0:
                        p.view(-1)[:left].mul_(one)
                        left -= p.numel()
            return loss

    return Planted


def _plant(plant: dict) -> None:
    """Swap the planted Adam in for optparity's (this process only)."""
    from optparity.bench import workloads

    original = workloads.optimizer_class

    def optimizer_class(algorithm, library):
        cls = original(algorithm, library)
        if algorithm == "Adam" and library == "optparity" and plant:
            return _planted(cls, plant.get("elements", 0), plant.get("temporary", False))
        return cls

    workloads.optimizer_class = optimizer_class


def child(plant: dict, cli_args: list[str], count_torch: bool = False) -> int:
    """One `optparity` command with the plant; its instruction counts (bench --instructions) run
    this script again under callgrind, with the same plant (ir_child)."""
    from optparity.bench import instructions
    from optparity.cli import main

    _plant(plant)
    instructions.child_argv = lambda: [sys.executable, __file__, "--ir-child", json.dumps(plant), "--"]
    if not count_torch:  # torch's counts: references, about 7 s a case under callgrind here
        count = instructions.count
        instructions.count = lambda cases, *a, **k: count([c for c in cases if c.impl.startswith("optparity-")],
                                                          *a, **k)
    return main(cli_args)


def ir_child(plant: dict, spec: str) -> int:
    """The callgrind side of bench --instructions, with the plant."""
    from optparity.bench import instructions

    _plant(plant)
    return instructions.child_main(json.loads(spec))


# ---------------------------------------------------------------- parent

def calibrate(fraction: float) -> int:
    """Elements of the extra mul_(1.0) pass that cost `fraction` of the target step's CPU time
    (medians of many interleaved calls, in a child so this process stays light)."""
    code = f"""
import statistics, time, torch
from optparity.bench.workloads import prepared
torch.set_num_threads(1)
opt = prepared("Adam", "optparity-foreach", "1M", "float32")
p = opt.param_groups[0]["params"][0]
step, full = [], []
for _ in range(60):
    t = time.process_time(); opt.step(); step.append(time.process_time() - t)
    t = time.process_time()
    with torch.no_grad():
        p.view(-1).mul_(1.0)
    full.append(time.process_time() - t)
print(statistics.median(step), statistics.median(full), p.numel())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    step, full, numel = out.stdout.split()
    k = round(int(numel) * fraction * float(step) / float(full))
    return max(1, min(10 * int(numel), k))


COUNT_TORCH: list[str] = []  # ["--count-torch"] when asked: passed on to the children


def _child(plant: dict, cli_args: list[str]) -> int:
    proc = subprocess.run([sys.executable, __file__, *COUNT_TORCH, "--child", json.dumps(plant), "--", *cli_args],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        sys.exit(f"optparity {' '.join(cli_args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return proc.returncode


def bench(work: Path, name: str, plant: dict, baseline: Path | None, count: bool) -> dict:
    """One bench run (with instruction counts when `count`), then (with a baseline) its comparison
    in a fresh process with the same plant: (exit code of the comparison, seconds, load average
    before and after)."""
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    _child(plant, ["bench", *MATRIX, "--out", str(work), "--run-name", name, "--no-progress", "--no-figures",
                   *(["--instructions"] if count else [])])
    code = 0
    if baseline is not None:
        code = _child(plant, ["report", "--compare", str(baseline), str(work / name), "--remeasure"])
    return {"exit": code, "seconds": time.monotonic() - t0, "load_before": load0, "load_after": os.getloadavg()[0]}


def verdicts(base: Path, new: Path) -> list[dict]:
    """Every figure's verdict by the CI rule (both passes), by the first pass alone, and what a
    naive comparison (raw wall-clock seconds, first pass) would have said."""
    from optparity.bench import compare, decide

    rule = decide.Rule()
    rows = {}
    for label, kwargs, clock in (("final", {}, "cpu"), ("first_pass", {"second_pass": False}, "cpu"),
                                 ("raw_wall", {"second_pass": False, "raw": True}, "wall")):
        table = compare.compare(compare.load(base, clock), compare.load(new, clock), rule, **kwargs)
        for bench_name, row in table.iterrows():
            r = rows.setdefault(bench_name, {"figure": bench_name, "kind": row["kind"]})
            r[label] = row["verdict"]
            if label == "final":
                r.update(ratio=row.get("ratio"), ci_low=row.get("ci_low"), ci_high=row.get("ci_high"),
                         p=row.get("p_slower"), ratio_again=row.get("ratio_again"), p_again=row.get("p_again"),
                         delta_bytes=row.get("delta_bytes"))
    return list(rows.values())


def expected(scenario: str, figure: str, kind: str) -> bool:
    """Whether this figure should be called a regression in this scenario: the target's timing
    and instruction count in both slowdowns, the memory plant's two figures. (The temporary adds
    a few hundred instructions to a step of tens of millions: not expected by instructions.)"""
    if scenario in ("slow20", "slow5+mem") and figure in (TARGET, TARGET_INSTRUCTIONS):
        return True
    return scenario == "slow5+mem" and figure in MEMORY_TARGETS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "reports" / "examples" / "tracker-proof"))
    ap.add_argument("--work", default=str(ROOT / "reports" / "tracker-proof-runs"),
                    help="where the bench runs go (large; not committed)")
    ap.add_argument("--busy-seconds", type=int, default=600, help="upper bound of the busy loop's life")
    ap.add_argument("--instructions", action=argparse.BooleanOptionalAction, default=shutil.which("valgrind") is not None,
                    help="also count instructions per step of every case under callgrind (bench --instructions); "
                         "default: on when valgrind is installed")
    ap.add_argument("--count-torch", action="store_true",
                    help="count torch's cases' instructions too (references; adds about 30 s per bench run here)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ir-child", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(json.loads(args.child), [a for a in args.rest if a != "--"], args.count_torch)
    if args.ir_child is not None:
        return ir_child(json.loads(args.ir_child), args.rest[-1])
    if args.instructions and shutil.which("valgrind") is None:
        ap.error("--instructions needs valgrind (apt-get install valgrind)")
    if args.count_torch:
        COUNT_TORCH.append("--count-torch")

    import pandas as pd

    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (out / "pages").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    k5, k20 = calibrate(0.05), calibrate(0.20)
    numel = 1 << 20
    plants = {"aa": {}, "aa-load": {}, "slow5+mem": {"elements": k5, "temporary": True}, "slow20": {"elements": k20}}
    print(f"calibrated: 5% = mul_ over {k5} elements, 20% = {k20} (of {numel})", flush=True)
    rows, runs = [], []
    for rep in range(args.reps):
        base = work / f"r{rep}-base"
        runs.append({"rep": rep, "scenario": "base", **bench(work, base.name, {}, None, args.instructions)})
        for scenario in SCENARIOS:
            busy = None
            if scenario == "aa-load":
                busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=args.busy_seconds)])
            try:
                name = f"r{rep}-{scenario}"
                run = bench(work, name, plants[scenario], base, args.instructions)
            finally:
                if busy is not None:
                    busy.terminate()
                    busy.wait()
            runs.append({"rep": rep, "scenario": scenario, **run})
            for v in verdicts(base, work / name):
                rows.append({"rep": rep, "scenario": scenario, **v,
                             "expected": expected(scenario, v["figure"], v["kind"])})
            if rep == 0:
                for f in ("compare.html", "compare.png", "index.html"):
                    if (work / name / f).exists():
                        shutil.copy(work / name / f, out / "pages" / f"{scenario}-{f}")
            print(f"rep {rep} {scenario}: exit {run['exit']}, {run['seconds']:.0f} s, "
                  f"load {run['load_before']:.1f}->{run['load_after']:.1f}", flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "results.csv", index=False)
    pd.DataFrame(runs).to_csv(out / "runs.csv", index=False)
    (out / "summary.md").write_text(summarize(table, pd.DataFrame(runs), k5, k20, numel,
                                              time.monotonic() - started, args.reps, args.instructions))
    print((out / "summary.md").read_text())
    return 0


def _caught(t, kind: str) -> str:
    exp = t[t["expected"] & (t["kind"] == kind)]
    return f"{int((exp['final'] == 'REGRESSION').sum())} / {len(exp)}" if len(exp) else "-"


def _false(t, kind: str, column: str = "final") -> int:
    return int(((t["kind"] == kind) & (t[column] == "REGRESSION") & ~t["expected"]).sum())


def _ratio(t, figure: str, digits: int = 3) -> str:
    r = t.loc[t["figure"] == figure, "ratio"].dropna()
    return f"{r.median():.{digits}f} ({r.min():.{digits}f}-{r.max():.{digits}f})" if len(r) else "-"


def summarize(table, runs, k5: int, k20: int, numel: int, seconds: float, reps: int, counted: bool = True) -> str:
    """summary.md: per scenario, false alarms and detections by timing, memory and instructions."""
    import pandas as pd

    n_ir = int((table["kind"] == "instructions").sum() / max(1, len(table[["rep", "scenario"]].drop_duplicates())))
    lines = ["# Tracker proof: false alarms and detections of `optparity bench --baseline`", "",
             f"Command: `.venv/bin/python scripts/tracker_proof.py --reps {reps}"
             f"{'' if counted else ' --no-instructions'}`; total {seconds / 60:.1f} min. "
             f"Matrix: {' '.join(MATRIX)} (per comparison: 4 optparity timings tested, 4 torch references, "
             f"24 exact memory figures, {n_ir} instruction counts per step).",
             f"Plants: slow5 = extra mul_(1.0) over {k5} elements of the {numel}-element parameter, slow20 = over "
             f"{k20}; mem = one extra empty_like per parameter held through the forloop step ({numel * 4} bytes).",
             "",
             "| scenario | runs | exit codes | false alarms by timing (final / first pass only / raw wall clock) "
             "| false alarms by memory | false alarms by instructions | caught by timing | caught by memory "
             "| caught by instructions | target timing ratio NEW/BASE (median, range) | target instructions ratio "
             "(median, range) | load average during the runs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        t = table[table["scenario"] == scenario]
        r = runs[runs["scenario"] == scenario]
        mem = _caught(t, "memory")
        if scenario == "slow5+mem":
            deltas = sorted(set(t.loc[t["figure"].isin(MEMORY_TARGETS), "delta_bytes"].dropna().astype(int)))
            mem += f" (delta bytes {deltas})"
        loads = pd.concat([r["load_before"], r["load_after"]])
        lines.append(f"| {scenario} | {len(r)} | {','.join(map(str, r['exit']))} | "
                     f"{_false(t, 'time')} / {_false(t, 'time', 'first_pass')} / {_false(t, 'time', 'raw_wall')} | "
                     f"{_false(t, 'memory')} | {_false(t, 'instructions') if counted else '-'} | "
                     f"{_caught(t, 'time')} | {mem} | {_caught(t, 'instructions') if counted else '-'} | "
                     f"{_ratio(t, TARGET)} | {_ratio(t, TARGET_INSTRUCTIONS, 4) if counted else '-'} | "
                     f"{loads.min():.1f}-{loads.max():.1f} |")
    lines += [""]
    for kind, label in (("time", "Timing"), ("memory", "Memory"), ("instructions", "Instruction-count")):
        k = table[table["kind"] == kind]
        if len(k):
            lines.append(f"{label} figures compared with nothing planted in them: {int((~k['expected']).sum())}; "
                         f"false alarms (final rule): {_false(table, kind)}.")
    if counted:
        ir = table[(table["kind"] == "instructions") & ~table["expected"]]
        moved = ir[ir["ratio"].notna() & (ir["ratio"] != 1.0)]
        lines += ["", f"Unplanted instruction counts identical to BASE's: {len(ir) - len(moved)} of {len(ir)}"
                  + (f"; the others moved by at most {float((moved['ratio'] - 1).abs().max()):.2e} (relative)."
                     if len(moved) else ".")]
        seconds_per_run = runs["seconds"].median()
        lines.append(f"Median seconds per bench run (timing, then the instruction counts), its comparison included: "
                     f"{seconds_per_run:.0f}.")
    lines += ["", "Verdict counts per scenario and kind (final rule):", "",
              table.groupby(["scenario", "kind", "final"]).size().rename("figures").reset_index().to_markdown(index=False),
              ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
