"""Instructions per optimizer step: a deterministic figure where the platform can count them.

Two counters exist on Linux. Hardware counters (perf_event_open, `perf stat -e instructions`)
cost nothing but are often absent in virtual machines and containers; `perf_supported()` says so.
Valgrind's callgrind counts every instruction it executes on any machine.

`count(cases)` runs ONE Python process under callgrind for all cases of a bench run, started with
instrumentation off (`--instr-atstart=no`): importing torch and building the optimizers run at
valgrind's uninstrumented speed. The child then switches instrumentation on itself with callgrind's
client requests (CALLGRIND_START_INSTRUMENTATION, _ZERO_STATS, _DUMP_STATS_AT of
<valgrind/callgrind.h>) and, per case, after warm-up steps, counts STEPS[0] steps into one dump and
STEPS[1] steps into the next. The count per step is the difference of the two dumps divided by the
difference of the step counts: what surrounds the steps (the client requests' own calls, the loop)
cancels. Python's garbage collector is off while counting (a collection triggered by allocation
counts would land in one window and not the other); glibc's malloc thresholds are fixed as in the
timed runs (workloads.steady_allocator).

Client requests are special no-op instruction sequences that valgrind recognises (valgrind.h,
"client requests"); without a C compiler they are emitted here as x86-64 machine code in an
executable page and called through ctypes. On other architectures the count falls back to whole
processes (STEPS[0] and STEPS[1] steps, imports and setup included and cancelled by the
difference), which is about as slow as callgrind over `import torch`: minutes per case.

Under valgrind torch sees valgrind's virtual CPU (AVX2, no AVX-512), so the figure counts torch's
AVX2 kernels whatever the host has. Used by `optparity bench --instructions`; the figure goes to
memory.csv as metric `instructions_per_step`. compare.py calls a rise beyond the minimum effect a
REGRESSION outright (decide.count_verdict): the count does not depend on the machine's load.
"""
from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

METRIC = "instructions_per_step"
STEPS = (1, 3)  # steps in the two counted windows; their difference is the denominator
WARMUP = 3      # uncounted steps per case before counting (state allocated, caches of the dispatcher warm)

# <valgrind/callgrind.h>: VG_USERREQ_TOOL_BASE('C','T') + the enum's position; <valgrind/valgrind.h>
_CT = (ord("C") & 0xFF) << 24 | (ord("T") & 0xFF) << 16
DUMP_STATS_AT, ZERO_STATS, START_INSTRUMENTATION, STOP_INSTRUMENTATION = _CT + 3, _CT + 1, _CT + 4, _CT + 5
RUNNING_ON_VALGRIND = 0x1001

# unsigned long request(unsigned long *args, unsigned long default): valgrind.h's amd64
# VALGRIND_DO_CLIENT_REQUEST_EXPR. %rax = args, %rdx = default; the four rotations of %rdi (by 128
# bits in all, a no-op) then `xchg %rbx,%rbx` are the marker valgrind replaces by the request, which
# leaves its result in %rdx. Natively the whole sequence does nothing and returns the default.
_AMD64_REQUEST = bytes.fromhex(
    "4889f8"      # mov rax, rdi
    "4889f2"      # mov rdx, rsi
    "48c1c703"    # rol rdi, 3
    "48c1c70d"    # rol rdi, 13
    "48c1c73d"    # rol rdi, 61
    "48c1c733"    # rol rdi, 51
    "4887db"      # xchg rbx, rbx
    "4889d0"      # mov rax, rdx
    "c3")         # ret


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


def parse_trigger(text: str) -> str | None:
    """What made callgrind write this dump: the string of CALLGRIND_DUMP_STATS_AT, else None."""
    m = re.search(r"^desc: Trigger: Client Request: (.*)$", text, flags=re.MULTILINE)
    return m.group(1).strip() if m else None


def per_step(dumps: dict[str, int], benchmark: str) -> float:
    """Instructions per step of `benchmark` from the two counted windows' totals."""
    low, high = (dumps.get(_label(benchmark, n)) for n in STEPS)
    if low is None or high is None:
        raise Unavailable(f"callgrind wrote no dump for {benchmark} (found: {', '.join(sorted(dumps)) or 'none'})")
    return (high - low) / (STEPS[1] - STEPS[0])


def _label(benchmark: str, steps: int) -> str:
    return f"{benchmark} steps={steps}"


# ---------------------------------------------------------------- child (runs under valgrind)

class ClientRequests:
    """valgrind client requests from Python (x86-64): the machine code above in an executable page."""

    def __init__(self):
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise Unavailable(f"client requests are encoded here for x86-64 only, not {platform.machine()}")
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(_AMD64_REQUEST)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._call = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong)(address)
        self._args = (ctypes.c_ulong * 6)()

    def __call__(self, request: int, arg1: int = 0, default: int = 0) -> int:
        self._args[0], self._args[1] = request, arg1
        return int(self._call(ctypes.addressof(self._args), default))


def child_main(spec: dict) -> int:
    """Count the spec's cases under callgrind (started with --instr-atstart=no): one pair of dumps
    per case, labelled `<benchmark> steps=<n>`."""
    import torch

    from optparity.bench.workloads import prepared, steady_allocator

    torch.set_num_threads(int(spec.get("threads", 1)))
    steady_allocator()
    request = ClientRequests()
    if request(RUNNING_ON_VALGRIND) == 0:
        print("optparity.bench.instructions: not running under valgrind", file=sys.stderr)
        return 2
    for algorithm, impl, workload, dtype in spec["cases"]:
        benchmark = f"{algorithm}/{impl}/{workload}/{dtype}"
        opt = prepared(algorithm, impl, workload, dtype, warmup_steps=WARMUP)
        step = opt.step
        request(START_INSTRUMENTATION)  # the guest's instructions do not depend on it: no warm-up here
        for n in STEPS:
            label = ctypes.create_string_buffer(_label(benchmark, n).encode())
            address = ctypes.addressof(label)
            gc.collect()
            gc.disable()
            request(ZERO_STATS)
            for _ in range(n):
                step()
            request(DUMP_STATS_AT, address)
            gc.enable()
        request(STOP_INSTRUMENTATION)
        del opt, step
    return 0


def child_argv() -> list[str]:
    """The Python command callgrind runs; the spec (JSON) follows it as the last argument.
    scripts/tracker_proof.py replaces it to count its planted optimizers."""
    return [sys.executable, "-m", "optparity.bench.instructions"]


# ---------------------------------------------------------------- parent

def _valgrind() -> str:
    path = shutil.which("valgrind")
    if path is None:
        raise Unavailable("valgrind is not installed (apt-get install valgrind)")
    return path


def count(cases, threads: int = 1, timeout: float = 3600) -> dict[str, float]:
    """Instructions per step of each case (objects with algorithm, impl, workload, dtype and
    benchmark), by one callgrind run; {benchmark: count}. Unavailable without valgrind."""
    valgrind = _valgrind()
    cases = list(cases)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {c.benchmark: count_per_step(c.algorithm, c.impl, c.workload, c.dtype, threads, timeout)
                for c in cases}
    spec = {"threads": threads, "cases": [[c.algorithm, c.impl, c.workload, c.dtype] for c in cases]}
    with tempfile.TemporaryDirectory(prefix="optparity-ir-") as tmp:
        out = Path(tmp) / "cg.out"
        cmd = [valgrind, "--tool=callgrind", "--instr-atstart=no", "--cache-sim=no", "--dump-instr=no",
               "--dump-line=no", f"--callgrind-out-file={out}", *child_argv(), json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONHASHSEED="0"))
        if proc.returncode != 0:
            raise Unavailable(f"valgrind exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        dumps = {}
        for f in Path(tmp).glob("cg.out*"):
            text = f.read_text(errors="replace")
            trigger = parse_trigger(text)
            if trigger is not None:
                dumps[trigger] = parse_callgrind_total(text)
    return {c.benchmark: per_step(dumps, c.benchmark) for c in cases}


_SCRIPT = """
import sys, torch
torch.set_num_threads({threads})
from optparity.bench.workloads import prepared
opt = prepared({algorithm!r}, {impl!r}, {workload!r}, {dtype!r})
for _ in range(int(sys.argv[1])):
    opt.step()
"""


def _callgrind(script: Path, steps: int, out: Path, timeout: float) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [_valgrind(), "--tool=callgrind", "--cache-sim=no", f"--callgrind-out-file={out}", sys.executable,
           str(script), str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise Unavailable(f"valgrind exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return parse_callgrind_total(out.read_text(errors="replace"))


def count_per_step(algorithm: str, impl: str, workload: str, dtype: str, threads: int = 1,
                   timeout: float = 3600) -> float:
    """One case by two whole processes under callgrind (STEPS[0] and STEPS[1] steps; imports and
    setup cancel in the difference): the fallback where client requests are not available, and
    slow (callgrind instruments `import torch`)."""
    with tempfile.TemporaryDirectory(prefix="optparity-ir-") as tmp:
        script = Path(tmp) / "steps.py"
        script.write_text(_SCRIPT.format(threads=threads, algorithm=algorithm, impl=impl, workload=workload,
                                         dtype=dtype))
        low, high = (_callgrind(script, n, Path(tmp) / f"cg.{n}", timeout) for n in STEPS)
    return (high - low) / (STEPS[1] - STEPS[0])


if __name__ == "__main__":
    sys.exit(child_main(json.loads(sys.argv[-1])))
