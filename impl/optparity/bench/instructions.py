"""Instructions per optimizer step: a deterministic figure where the platform can count them.

Two counters exist on Linux. Hardware counters (perf_event_open, `perf stat -e instructions`)
cost nothing but are often absent in virtual machines and containers; `perf_supported()` says so.
Valgrind's callgrind counts every instruction it executes on any machine, 20-100x slower. The
count for one step is the difference between two runs of the same script that differ only in the
number of steps, divided by that difference: imports, setup and warm-up cancel out.

Used by `optparity bench --instructions` (optional: a 1M case takes minutes under callgrind);
the figure goes to memory.csv as metric `instructions_per_step` and is compared like the exact
memory figures, with the minimum effect as tolerance (a handful of instructions moves with
address-space layout).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

METRIC = "instructions_per_step"
STEPS = (2, 6)  # the two runs' step counts; their difference is the denominator

_SCRIPT = """
import sys, torch
torch.set_num_threads({threads})
from optparity.bench.workloads import prepared
opt = prepared({algorithm!r}, {impl!r}, {workload!r}, {dtype!r})
for _ in range(int(sys.argv[1])):
    opt.step()
"""


class Unavailable(RuntimeError):
    """No instruction counter on this machine; the message says which and why."""


def perf_supported() -> tuple[bool, str]:
    """Whether `perf stat` can count user-space instructions here, and what it said."""
    perf = shutil.which("perf")
    if perf is None:
        return False, "perf is not installed"
    try:
        out = subprocess.run([perf, "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"perf failed: {e}"
    line = next((x for x in out.stderr.splitlines() if "instructions" in x), out.stderr.strip())
    ok = out.returncode == 0 and line.split(",")[0].strip().isdigit()
    return ok, line


def parse_callgrind_total(text: str) -> int:
    """The total instruction count (Ir) of a callgrind output file."""
    for pattern in (r"^totals:\s+(\d+)", r"^summary:\s+(\d+)"):
        m = re.search(pattern, text, flags=re.MULTILINE)
        if m:
            return int(m.group(1))
    raise ValueError("no 'totals:' or 'summary:' line: not a callgrind output file")


def _callgrind(script: Path, steps: int, out: Path, timeout: float) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = ["valgrind", "--tool=callgrind", "--cache-sim=no", f"--callgrind-out-file={out}", sys.executable,
           str(script), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise Unavailable(f"valgrind exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return parse_callgrind_total(out.read_text(errors="replace"))


def count_per_step(algorithm: str, impl: str, workload: str, dtype: str, threads: int = 1,
                   timeout: float = 3600) -> float:
    """Instructions one step of this case executes, by callgrind (Unavailable without valgrind)."""
    if shutil.which("valgrind") is None:
        raise Unavailable("valgrind is not installed (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="optparity-ir-") as tmp:
        script = Path(tmp) / "steps.py"
        script.write_text(_SCRIPT.format(threads=threads, algorithm=algorithm, impl=impl, workload=workload,
                                         dtype=dtype))
        low, high = (_callgrind(script, n, Path(tmp) / f"cg.{n}", timeout) for n in STEPS)
    return (high - low) / (STEPS[1] - STEPS[0])
