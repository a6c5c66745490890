"""Golden fingerprints: torch.optim's bits recorded once, checked later without that torch.

`record` runs a reference (torch.optim by default) over the case matrix and keeps, per case and
step, a digest of the exact bytes of every parameter, every state tensor, every state_dict
param_group and the closure's loss. `check_against` runs a candidate over the same case ids and
compares digests, so "did upgrading torch change my optimizer's bits, and from which step?" is
answered with only the new torch installed:

    optparity reference record                   # on torch A: writes reference/golden/*.txt
    optparity check --all --golden               # on torch B: exit 0 same bits, 1 drift, 2 cannot compare

One text file per reference. A header (torch, python, platform, ATen CPU capability), then one
block per case (sorted by case id), one line per step:

    layout 3fa2c1 scalar0d matrix ... matrix.exp_avg ... group0 loss      (entry lists, in the header)
    case Adam/forloop/float32/mixed/c0[defaults]
      seed 1234 steps 12 protocol state_dict+param_groups layout 3fa2c1 config {}
      <step> <inputs> <digest> <short>         short: 2 hex digits per layout entry, '--' when absent
      <step> <inputs> raised "<Type>: <message>"

<inputs> digests what the case fed in (initial parameters at step 0, gradients after), so a
changed parameter set or RNG is told apart from drift. <digest> (48 bits, over every entry's
128-bit digest) decides; <short> only names the entries that differ.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from optparity.harness import conditions, matrix, runner
from optparity.harness.candidates import NotApplicable, make_driver
from optparity.harness.matrix import CROSS_LOAD, LR_CHANGE, RELOAD_OWN, Case
from optparity.harness.params import make_grads, make_params

FORMAT = 1
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "reference" / "golden"
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Recorded for information; the ones in COMPARABLE_KEYS must equal the running machine's.
ENV_KEYS = ("torch", "python", "platform", "cpu_capability")
COMPARABLE_KEYS = ("platform", "cpu_capability")


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": f"{platform.system()}-{platform.machine()}",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


@functools.cache
def forced_capability() -> str | None:
    """The CPU's own ATen capability when ATEN_CPU_CAPABILITY forces a narrower one, else None.
    Forcing narrows only ATen's own dispatch: other kernels still use the CPU's width (an AVX512
    machine forced to avx2 drifted on 84 of Adam's 478 recorded AVX2 cases), so such a run cannot
    be compared with goldens of a machine of the forced capability. Asked of a child without the
    variable (only when it is set)."""
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        return None
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env=env, capture_output=True, text=True, timeout=300).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out if out and out != torch.backends.cpu.get_cpu_capability() else None


def machine_capability() -> str:
    """The CPU's own ATen capability, whatever ATEN_CPU_CAPABILITY forces."""
    return forced_capability() or environment()["cpu_capability"]


def machine_dir(directory: Path) -> Path:
    """Where this machine type's goldens go by default: DIR-<platform>-<capability>, next to DIR."""
    return directory.with_name(f"{directory.name}-{environment()['platform']}-{machine_capability()}".lower())


def record_hint(directory: Path, check_command: str, record_options: str = "") -> str:
    """The one line that tells how to compare on this machine type: record here, then check. Under
    a forced capability both commands run without it (a forced run is refused either way)."""
    env = environment()
    out = machine_dir(directory)
    try:
        out = out.relative_to(Path.cwd())
    except ValueError:
        pass
    unset = "env -u ATEN_CPU_CAPABILITY " if forced_capability() else ""
    return (f"goldens for this machine ({env['platform']}, CPU capability {machine_capability()}): record them "
            f"once with `{unset}optparity reference record --out {out}{record_options}`, then run "
            f"`{unset}{check_command} --golden {out}`")


class GoldenError(Exception):
    """The goldens cannot be read or cannot be compared with this build (exit 2, not drift)."""


# ---------------------------------------------------------------- hashing

# Integer view, exponent mask, mantissa mask and the canonical quiet NaN of each float dtype.
_NAN_BITS = {
    torch.float64: (torch.int64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF, 0x7FF8000000000000),
    torch.float32: (torch.int32, 0x7F800000, 0x007FFFFF, 0x7FC00000),
    torch.float16: (torch.int16, 0x7C00, 0x03FF, 0x7E00),
    torch.bfloat16: (torch.int16, 0x7F80, 0x007F, 0x7FC0),
}


def _tensor_bytes(t: Tensor) -> bytes:
    if t.requires_grad:
        t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_complex():
        t = torch.view_as_real(t)
    t = t.contiguous()
    if t.dtype not in _NAN_BITS:
        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    if t.dtype is not torch.bfloat16:
        values = t.numpy()
        if not np.isnan(values).any():
            return values.tobytes()
    int_dtype, exp, mant, canonical = _NAN_BITS[t.dtype]
    bits = t.view(int_dtype).numpy()
    nan = ((bits & exp) == exp) & ((bits & mant) != 0)
    if nan.any():  # compare() treats every NaN alike: so do the fingerprints
        bits = bits.copy()
        bits[nan] = canonical
    return bits.tobytes()


def _feed(h, value: Any) -> None:
    """Feed a canonical byte form of `value` to `h`: dtype, shape and contiguous bytes for
    tensors (strides do not matter, NaN payloads neither), repr for plain values."""
    if isinstance(value, Tensor):
        h.update(f"T{value.dtype}{tuple(value.shape)}{value.layout}|".encode())
        if value.layout == torch.sparse_coo:  # as given: uncoalesced duplicates are part of the input
            h.update(_tensor_bytes(value._indices()))
            h.update(_tensor_bytes(value._values()))
        else:
            h.update(_tensor_bytes(value if value.layout == torch.strided else value.to_dense()))
    elif isinstance(value, dict):
        h.update(b"D{")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode() + b":")
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"L(" if isinstance(value, list) else b"U(")
        for v in value:
            _feed(h, v)
            h.update(b",")
        h.update(b")")
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


def digest(value: Any, size: int = 16) -> str:
    h = hashlib.blake2b(digest_size=size)
    _feed(h, value)
    return h.hexdigest()


def _step_digest(entries: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=6)
    for name in sorted(entries):
        h.update(f"{name}={entries[name]};".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- one run

@dataclass
class StepPrint:
    step: int
    inputs: str
    entries: dict[str, str] = field(default_factory=dict)  # name -> full digest
    error: str | None = None

    @property
    def digest(self) -> str:
        return _step_digest(self.entries)


@dataclass
class Trace:
    """What one optimizer did over one case: a StepPrint per step (0 = after construction)."""

    steps: list[StepPrint]
    protocol: str  # which calls the driver supports; candidate and golden must agree


def _attempt(fn):
    """The runner's _attempt, with the error as its recorded text (an error is a fingerprint too)."""
    value, error = runner._attempt(fn)
    return value, None if error is None else runner._error_text(error)


def _grad_through_step(pset) -> dict[str, Tensor | None]:
    """The runner's gradient through the step (differentiable=True), by parameter name."""
    _, grads = runner._grad_through_step(pset)
    names = [n for n, leaf in zip(pset.names, pset.leaves) if leaf.requires_grad]
    return dict(zip(names, grads))


def _fingerprint(driver, pset, loss=None, with_loss=False, through_step=None) -> dict[str, str]:
    out = {}
    for name, p in zip(pset.names, pset.params):
        out[name] = digest(p)
    for i, state in sorted(driver.state().items()):
        for key, value in state.items():
            out[f"{pset.names[i]}.{key}"] = digest(value)
    if getattr(driver, "supports_state_dict", False):
        # The optimizer's own state_dict(), not the driver's deep copy: read only, and a
        # differentiable state (non-leaf tensors) cannot be deep-copied.
        opt = getattr(driver, "opt", None)
        sd = opt.state_dict() if opt is not None else driver.state_dict()
        for g, group in enumerate(sd["param_groups"]):
            out[f"group{g}"] = digest(group)
    if with_loss:
        out["loss"] = digest(loss)
    for name, g in (through_step or {}).items():
        out[f"grad.{name}"] = digest(g)
    return out


def trace(case: Case, obj: Any, kind: str, steps: int | None = None) -> Trace:
    """Run one optimizer over `case` the way the runner drives a reference: under the case's
    conditions (threads, default dtype, GradScaler), step(closure) on even steps, rebuilt from its
    own state_dict after RELOAD_OWN and CROSS_LOAD steps (there is no other side to cross-load
    with), lr halved after LR_CHANGE. Raises NotApplicable like the driver."""
    with conditions.applied(case):
        return _trace(case, obj, kind, steps)


def _trace(case: Case, obj: Any, kind: str, steps: int | None) -> Trace:
    steps = case.steps if steps is None else steps
    differentiable = bool(case.config.get("differentiable"))
    pset = make_params(case.param_set, case.dtype, case.seed, case.second_group, differentiable=differentiable)
    hyper = {**case.config, **case.path_kwargs()}
    start = StepPrint(0, digest(pset.params, 2))
    driver, start.error = _attempt(lambda: make_driver(obj, kind, case.algorithm, pset, hyper))
    if driver is None:
        return Trace([start], "-")
    reloadable = not differentiable and getattr(driver, "supports_state_dict", False)
    param_groups = getattr(driver, "supports_param_groups", False)
    protocol = "+".join(n for n, on in (("state_dict", getattr(driver, "supports_state_dict", False)),
                                         ("param_groups", param_groups)) if on) or "plain"
    entries, start.error = _attempt(lambda: _fingerprint(driver, pset))
    start.entries = entries or {}
    prints = [start]
    for step in range(1, steps + 1):
        if prints[-1].error is not None:
            break
        grads = make_grads(pset, case.seed, step)
        now = StepPrint(step, digest(grads, 2))
        prints.append(now)
        loss, now.error = _attempt(lambda: conditions.step(case, driver, grads, step))
        if now.error is not None:
            break
        through = None
        if differentiable and step == 1:
            through, now.error = _attempt(lambda: _grad_through_step(pset))
            if now.error is not None:
                break
        entries, now.error = _attempt(lambda: _fingerprint(driver, pset, loss, param_groups and step % 2 == 0,
                                                           through))
        now.entries = entries or {}
        if now.error is None and reloadable and step in (RELOAD_OWN, CROSS_LOAD):
            _, err = _attempt(lambda: driver.reload(driver.state_dict()))
            if err is not None:
                now.entries, now.error = {}, f"reloading its own state_dict: {err}"
        if step == LR_CHANGE and param_groups:
            driver.scale_lr(0.5)
    return Trace(prints, protocol)


# ---------------------------------------------------------------- the file format

@dataclass
class GoldenCase:
    case_id: str
    seed: int
    n_steps: int
    definition: str  # config and second group, for people reading the file
    protocol: str
    entries: list[str]
    steps: list[tuple[int, str, str, str]]  # (step, inputs, digest | "raised", short | error text)

    @classmethod
    def of(cls, case: Case, tr: Trace) -> "GoldenCase":
        entries: list[str] = []
        for sp in tr.steps:
            entries += [n for n in sp.entries if n not in entries]
        lines = []
        for sp in tr.steps:
            if sp.error is not None:
                lines.append((sp.step, sp.inputs, "raised", json.dumps(sp.error)))
            else:
                short = "".join(sp.entries[n][:2] if n in sp.entries else "--" for n in entries)
                lines.append((sp.step, sp.inputs, sp.digest, short))
        definition = f"config {case.config!r}".replace("\n", " ")
        return cls(case.id, case.seed, case.steps, definition, tr.protocol, entries, lines)

    @property
    def layout(self) -> str:
        """Key of the entry list in the file's header (many cases share one)."""
        return hashlib.blake2b(" ".join(self.entries).encode(), digest_size=3).hexdigest()

    def lines(self) -> list[str]:
        out = [f"case {self.case_id}",
               f"  seed {self.seed} steps {self.n_steps} protocol {self.protocol} layout {self.layout} {self.definition}"]
        out += [f"  {s} {i} {d} {x}" for s, i, d, x in self.steps]
        return out


@dataclass
class GoldenFile:
    path: Path
    reference: str
    algorithm: str
    steps: int
    env: dict[str, str]
    cases: dict[str, GoldenCase]
    second_group: str = "{}"

    def text(self) -> str:
        head = [f"# optparity golden fingerprints, format {FORMAT}",
                "# regenerate: optparity reference record; check: optparity check --golden",
                "# case lines: <step> <inputs> <digest> <2 hex per entry of its layout, '--' absent> | raised <error>",
                f"reference {self.reference}", f"algorithm {self.algorithm}", f"steps {self.steps}",
                f"second_group {self.second_group}"]
        head += [f"{k} {self.env[k]}" for k in ENV_KEYS]
        layouts = {c.layout: c.entries for c in self.cases.values()}
        head += [f"layout {key} {' '.join(layouts[key])}" for key in sorted(layouts)]
        body = [line for cid in sorted(self.cases) for line in self.cases[cid].lines()]
        return "\n".join(head + body) + "\n"


def _bad(path: Path, lineno: int, why: str) -> GoldenError:
    return GoldenError(f"{path}:{lineno}: {why}")


def read_golden(path: Path) -> GoldenFile:
    path = Path(path)
    lines = path.read_text().splitlines()
    meta: dict[str, str] = {}
    layouts: dict[str, list[str]] = {}
    cases: dict[str, GoldenCase] = {}
    current: GoldenCase | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        if line.startswith("case "):
            cid = line[5:]
            if cid in cases:
                raise _bad(path, n, f"case {cid} appears twice")
            current = cases[cid] = GoldenCase(cid, -1, 0, "", "", [], [])
        elif not line.startswith("  "):
            key, _, value = line.partition(" ")
            if current is not None or not value:
                raise _bad(path, n, f"unexpected line {line[:60]!r}")
            if key == "layout":
                name, _, entries = value.partition(" ")
                layouts[name] = entries.split()
            else:
                meta[key] = value
        elif current is None:
            raise _bad(path, n, "step line before any 'case' line")
        else:
            body = line[2:]
            if body.startswith("seed "):
                parts = body.split(" ", 8)
                if (len(parts) < 8 or parts[2] != "steps" or parts[4] != "protocol" or parts[6] != "layout"
                        or not parts[1].isdigit() or not parts[3].isdigit()):
                    raise _bad(path, n, "expected 'seed N steps S protocol P layout L ...'")
                if parts[7] not in layouts:
                    raise _bad(path, n, f"layout {parts[7]} is not in the header")
                current.seed, current.n_steps, current.protocol = int(parts[1]), int(parts[3]), parts[5]
                current.entries = layouts[parts[7]]
                current.definition = parts[8] if len(parts) > 8 else ""
            else:
                parts = body.split(" ", 3)
                if len(parts) != 4 or not parts[0].isdigit():
                    raise _bad(path, n, f"malformed step line {body[:60]!r}")
                step, inputs, dig, rest = int(parts[0]), parts[1], parts[2], parts[3]
                if dig == "raised":
                    try:
                        rest = json.loads(rest)
                    except json.JSONDecodeError as e:
                        raise _bad(path, n, f"error text is not a JSON string: {e}") from None
                elif len(rest) != 2 * len(current.entries):
                    raise _bad(path, n, f"{len(rest) // 2} short digests for {len(current.entries)} entries")
                current.steps.append((step, inputs, dig, rest))
    missing = [k for k in ("reference", "algorithm", "steps", *ENV_KEYS) if k not in meta]
    if missing:
        raise GoldenError(f"{path}: header lacks {', '.join(missing)} (not an optparity golden file?)")
    if not meta["steps"].isdigit():
        raise GoldenError(f"{path}: 'steps {meta['steps']}' is not a number")
    return GoldenFile(path, meta["reference"], meta["algorithm"], int(meta["steps"]),
                      {k: meta[k] for k in ENV_KEYS}, cases, meta.get("second_group", "{}"))


def read_dir(directory: Path) -> dict[str, GoldenFile]:
    """reference label -> its golden file, for every *.txt in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise GoldenError(f"no golden directory {directory} (record one with: optparity reference record --out {directory})")
    files = {}
    for path in sorted(directory.glob("*.txt")):
        g = read_golden(path)
        if g.reference in files:
            raise GoldenError(f"{path} and {files[g.reference].path} both record {g.reference}")
        files[g.reference] = g
    if not files:
        raise GoldenError(f"{directory} holds no golden files (*.txt)")
    return files


# ---------------------------------------------------------------- recording

def references(algorithms: Iterable[str] | None = None, functional: bool = True) -> list[tuple[str, str]]:
    """(reference label, algorithm): torch.optim's class for every algorithm and, where
    torch.distributed.optim has one, its functional class (the reference of optparity's Functional*)."""
    from optparity.harness.algorithms import ALGORITHMS, SPECS
    from optparity.harness.upstream import upstream_functional

    out = []
    for algo in algorithms or ALGORITHMS:
        out.append((f"torch.optim:{algo}", algo))
        if functional and SPECS[algo].functional_upstream:
            out.append((upstream_functional(algo), algo))
    return out


def file_name(reference: str) -> str:
    module, _, name = reference.partition(":")
    return f"{name.lstrip('_')}.txt" if module.startswith("torch.") else f"{module}.{name}.txt"


def record_reference(reference: str, algorithm: str, cases: list[Case], steps: int = matrix.STEPS,
                     out_dir: Path = DEFAULT_DIR, env: dict[str, str] | None = None) -> GoldenFile:
    """Trace `reference` over `cases` (each for its own case.steps); `steps` is the header's default."""
    from optparity.harness.runner import Subject

    subject = Subject.of(reference, algorithm)
    from optparity.harness.algorithms import spec

    golden = GoldenFile(Path(out_dir) / file_name(reference), reference, algorithm, steps,
                        env or environment(), {}, repr(spec(algorithm).second_group))
    for case in cases:
        try:
            tr = trace(case, subject.obj, subject.kind)
        except NotApplicable:
            continue  # the reference cannot express the case; nothing to hold a candidate to
        golden.cases[case.id] = GoldenCase.of(case, tr)
    return golden


# What forked recording workers read (set before the fork: closures do not pickle).
_JOB: dict = {}


def _record_one(index: int) -> tuple[str, str, int]:
    reference, algo = _JOB["references"][index]
    if _JOB["threads"] is not None:
        torch.set_num_threads(_JOB["threads"])
    golden = record_reference(reference, algo, _JOB["cases_for"](algo), _JOB["steps"], _JOB["out_dir"], _JOB["env"])
    golden.path.write_text(golden.text())
    return reference, str(golden.path), len(golden.cases)


def record(out_dir: Path = DEFAULT_DIR, algorithms: Iterable[str] | None = None,
           cases_for: Callable[[str], list[Case]] | None = None, steps: int = matrix.STEPS,
           functional: bool = True, threads: int | None = 1, env: dict[str, str] | None = None,
           workers: int | None = None, progress=None) -> list[Path]:
    """Record every reference's goldens, one file each, `workers` forked processes at a time
    (default: the CPU count); returns the files written. cases_for(algorithm) gives the cases
    (default: the whole default matrix). Files of other references in `out_dir` stay."""
    import multiprocessing
    import os

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = references(algorithms, functional)
    _JOB.update(references=refs, cases_for=cases_for or (lambda algo: matrix.build_cases(
                    [algo], steps=None if steps == matrix.STEPS else steps)),
                steps=steps, out_dir=out_dir, env=env or environment(), threads=threads)
    workers = min(workers or os.cpu_count() or 1, len(refs))
    previous = torch.get_num_threads()
    written = []
    try:
        if workers <= 1:
            results = map(_record_one, range(len(refs)))
        else:
            pool = multiprocessing.get_context("fork").Pool(workers)
            results = pool.imap(_record_one, range(len(refs)))
        for reference, path, count in results:
            written.append(Path(path))
            if progress:
                progress(reference, Path(path), count)
        if workers > 1:
            pool.close()
            pool.join()
    finally:
        if workers > 1:
            pool.terminate()
        torch.set_num_threads(previous)
        _JOB.clear()
    return written


# ---------------------------------------------------------------- checking

@dataclass
class Drift:
    case_id: str
    step: int
    tensors: list[str]
    message: str

    def describe(self) -> str:
        return f"{self.case_id}: step {self.step}: {self.message}"


@dataclass
class GoldenReport:
    candidate: str
    reference: str
    golden: Path | None
    recorded: dict[str, str]
    running: dict[str, str]
    checked: int = 0
    matched: int = 0
    skipped: int = 0
    drift: list[Drift] = field(default_factory=list)
    incomparable: list[str] = field(default_factory=list)  # why some or all could not be compared
    # cases of the level asked that the golden file lacks (recorded by an older matrix, or a
    # narrower recording): not checked, said so, but no failure: what was recorded still holds
    not_recorded: list[str] = field(default_factory=list)
    level: str | None = None
    other_machine: bool = False  # recorded on another machine type (record_hint says what to do)

    @property
    def exit_code(self) -> int:
        if self.drift:
            return 1
        return 2 if self.incomparable or not self.checked else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def format_text(self, limit: int = 10) -> str:
        rec, run = self.recorded, self.running
        lines = [f"{self.candidate} against golden {self.reference}"
                 + (f" ({self.golden})" if self.golden else ""),
                 f"  recorded on torch {rec.get('torch', '?')} {rec.get('platform', '?')} {rec.get('cpu_capability', '?')}; "
                 f"running torch {run['torch']} {run['platform']} {run['cpu_capability']}"]
        lines += [f"  CANNOT COMPARE: {why}" for why in self.incomparable[:limit]]
        if len(self.incomparable) > limit:
            lines.append(f"  ... and {len(self.incomparable) - limit} more that cannot be compared")
        if self.not_recorded:
            lines.append(f"  NOT RECORDED: {len(self.not_recorded)} case(s) of the {self.level} level are not in "
                         f"{self.golden.name if self.golden else 'the golden file'} (e.g. {self.not_recorded[0]}), "
                         "so they were not checked: a recording of an older case matrix or a narrower one; "
                         "re-record with: optparity reference record")
        lines += [f"  DRIFT {d.describe()}" for d in self.drift[:limit]]
        if len(self.drift) > limit:
            lines.append(f"  ... and {len(self.drift) - limit} more drifted cases")
        verdict = {0: "same bits", 1: "DRIFT", 2: "CANNOT COMPARE"}[self.exit_code]
        lines.append(f"  {self.checked} cases checked, {self.matched} match, {len(self.drift)} drift, "
                     f"{self.skipped} not applicable"
                     + (f", {len(self.not_recorded)} not recorded" if self.not_recorded else "") + f": {verdict}")
        return "\n".join(lines)


def _compare_case(gc: GoldenCase, tr: Trace, report: GoldenReport) -> None:
    if tr.protocol != gc.protocol and gc.protocol != "-" and tr.protocol != "-":
        report.incomparable.append(
            f"{gc.case_id}: recorded with a driver supporting {gc.protocol}, the candidate supports "
            f"{tr.protocol}; the same calls cannot be replayed")
        return
    mine = {sp.step: sp for sp in tr.steps}
    for step, inputs, dig, rest in gc.steps:
        sp = mine.get(step)
        if sp is None:
            last = tr.steps[-1]
            report.drift.append(Drift(gc.case_id, step, [], f"the candidate stopped after step {last.step} "
                                      f"({last.error or 'no error'}); the golden goes on"))
            return
        if sp.inputs != inputs:
            report.incomparable.append(
                f"{gc.case_id}: step {step}: the inputs differ from the recording (parameter set, gradients "
                "or torch's random generator changed); re-record the goldens")
            return
        if dig == "raised" or sp.error is not None:
            if dig == "raised" and sp.error == rest:
                continue
            golden_says = f"raised {rest}" if dig == "raised" else "no error"
            report.drift.append(Drift(gc.case_id, step, [], f"golden: {golden_says} | candidate: "
                                      f"{'raised ' + sp.error if sp.error else 'no error'}"))
            return
        if sp.digest == dig:
            continue
        named = [n for i, n in enumerate(gc.entries)
                 if (sp.entries[n][:2] if n in sp.entries else "--") != rest[2 * i:2 * i + 2]]
        extra = [n for n in sp.entries if n not in gc.entries]
        parts = []
        if named:
            parts.append(f"differs: {', '.join(named)}")
        if extra:
            parts.append(f"only the candidate has: {', '.join(extra)}")
        report.drift.append(Drift(gc.case_id, step, named + extra,
                                  "; ".join(parts) or "the step's digest differs (no single entry's short "
                                  "digest tells which)"))
        return
    if len(tr.steps) > len(gc.steps):
        report.drift.append(Drift(gc.case_id, tr.steps[len(gc.steps)].step, [],
                                  f"the golden stopped ({gc.steps[-1][3] if gc.steps[-1][2] == 'raised' else 'end'}), "
                                  "the candidate went on"))
        return
    report.matched += 1


def _same_object(label: str, reference: str) -> bool:
    """'torch.optim:Adam' and 'torch.optim.Adam' name the same reference."""
    from optparity.harness.candidates import load_object

    if label == reference:
        return True
    try:
        return load_object(label) is load_object(reference)
    except ValueError:
        return False


def _selected(case: Case, paths, dtypes, param_sets) -> bool:
    return ((paths is None or case.path in paths) and (dtypes is None or case.dtype in dtypes)
            and (param_sets is None or case.param_set in param_sets))


def check_against(candidate: Any, golden: Path | GoldenFile | None = None, reference: str | None = None,
                  *, algorithm: str | None = None, paths=None, dtypes=None, param_sets=None,
                  case_filter: str | None = None, level_ids=None, fail_fast: bool = False, threads: int | None = 1, running: dict[str, str] | None = None,
                  progress=None, level: str | None = None) -> GoldenReport:
    """Check `candidate` against recorded fingerprints instead of running the reference.

    golden: a golden directory (default reference/golden), a file, or a read GoldenFile; the file
    used is the one recording `reference` (default: torch.optim's class for the candidate's
    algorithm). paths/dtypes/param_sets/case_filter narrow the recorded cases (None: all of them);
    level_ids(algorithm) -> case ids, when given, too. level: name the cases of that level (so
    narrowed) that the file lacks in report.not_recorded (they cannot be checked).
    """
    from optparity.harness.runner import Subject, default_reference, matches_filter

    running = running or environment()
    cand = Subject.of(candidate, algorithm)
    if reference is None:
        reference = default_reference(cand).label
    algo = cand.algorithm or Subject.of(reference).algorithm
    report = GoldenReport(cand.label, reference, None, {}, running)
    try:
        if isinstance(golden, GoldenFile):
            gfile = golden
        elif golden is not None and Path(golden).is_file():
            gfile = read_golden(Path(golden))
        else:
            files = read_dir(Path(golden) if golden is not None else DEFAULT_DIR)
            found = [g for label, g in files.items() if _same_object(label, reference)]
            if not found:
                raise GoldenError(f"no golden file records {reference} (have: {', '.join(sorted(files))}); "
                                  "record it with: optparity reference record")
            gfile = found[0]
    except GoldenError as e:
        report.incomparable.append(str(e))
        return report
    report.golden, report.recorded = gfile.path, gfile.env
    if not _same_object(gfile.reference, reference):
        report.incomparable.append(f"{gfile.path} records {gfile.reference}, not {reference}")
        return report
    differ = [f"{k} {gfile.env[k]!r} (running: {running[k]!r})" for k in COMPARABLE_KEYS if gfile.env[k] != running[k]]
    if differ:
        report.other_machine = True
        report.incomparable.append(
            "recorded under another " + " and ".join(differ) + "; torch's kernels differ by CPU capability "
            "and platform, so these fingerprints cannot be compared here (this is not drift)")
        return report
    native = forced_capability()
    if native:
        report.other_machine = True
        report.incomparable.append(
            f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} forces {running['cpu_capability']} on a "
            f"{native} CPU, but kernels outside ATen's dispatch keep the CPU's width, so a forced run does not "
            f"reproduce a {running['cpu_capability']} machine's bits (this is not drift); unset it")
        return report
    algo = algo or gfile.algorithm
    cand.algorithm = cand.algorithm or algo
    # a recording made with the default steps lets each algorithm use its own (the ids say them)
    own = None if gfile.steps == matrix.STEPS else gfile.steps
    known = {c.id: c for c in matrix.build_cases([gfile.algorithm], dtypes=ALL_DTYPES, steps=own)}
    unknown = [cid for cid in gfile.cases if cid not in known]
    if unknown:
        report.incomparable.append(
            f"{len(unknown)} case id(s) of {gfile.path.name} are unknown to this version of the case matrix "
            f"(e.g. {unknown[0]}); record goldens with this version of optparity")
    changed = [cid for cid, gc in gfile.cases.items() if cid in known and known[cid].seed != gc.seed]
    if changed:
        report.incomparable.append(f"{len(changed)} case(s) now have another seed than recorded (e.g. {changed[0]})")
    wanted = level_ids(gfile.algorithm) if level_ids is not None else None
    if level is not None:
        from optparity.harness import levels

        report.level = level
        report.not_recorded = [c.id for c in levels.select(level, gfile.algorithm, paths=paths, dtypes=dtypes,
                                                           param_sets=param_sets, steps=own)
                               if c.id not in gfile.cases and matches_filter(c.id, case_filter)]
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for cid in sorted(gfile.cases):
            if wanted is not None and cid not in wanted:
                continue
            case = known.get(cid)
            if (case is None or cid in changed or not _selected(case, paths, dtypes, param_sets)
                    or not matches_filter(cid, case_filter)):
                continue
            gc = gfile.cases[cid]
            try:
                tr = trace(case, cand.obj, cand.kind, steps=gc.n_steps)
            except NotApplicable:
                report.skipped += 1
                continue
            report.checked += 1
            _compare_case(gc, tr, report)
            if progress:
                progress(report)
            if fail_fast and report.drift:
                break
    finally:
        torch.set_num_threads(previous)
    return report


def exit_code(reports: list[GoldenReport]) -> int:
    """1 when anything drifted (a finding), else 2 when something could not be compared, else 0."""
    codes = [r.exit_code for r in reports]
    return 1 if 1 in codes else (2 if 2 in codes or not codes else 0)


# ---------------------------------------------------------------- command line

def _pairs_for(args) -> list[tuple[str, str | None]]:
    if getattr(args, "all", False):
        from optparity.cli import _all_candidates

        return _all_candidates()
    return [(args.candidate, args.reference)]


def run_golden_check(args, pairs: list[tuple[str, str | None]] | None = None, dtypes_by_name=None) -> int:
    """`optparity check --golden [DIR]` and `optparity reference check`: each candidate against
    the goldens of its reference. Exit 0 same bits, 1 drift, 2 cannot compare."""
    from optparity.harness import levels

    names = {**levels.DTYPE_NAMES, **(dtypes_by_name or {})}
    pairs = pairs if pairs is not None else _pairs_for(args)
    directory = Path(args.golden) if args.golden else DEFAULT_DIR
    dtypes = [names[d] for d in args.dtypes] if getattr(args, "dtypes", None) else None
    level = getattr(args, "level", None)
    reports = []
    for candidate, reference in pairs:
        try:
            report = check_against(candidate, directory, reference, algorithm=getattr(args, "algorithm", None),
                                   paths=args.paths, dtypes=dtypes, param_sets=args.param_sets,
                                   case_filter=getattr(args, "case_filter", None), fail_fast=args.fail_fast,
                                   threads=getattr(args, "threads", 1), level=level or "default",
                                   level_ids=(lambda algo: {c.id for c in levels.select(level, algo)})
                                   if level not in (None, "default") else None)
        except (ValueError, TypeError) as e:
            print(f"optparity check --golden: {candidate}: {e}", file=sys.stderr)
            return 2
        print(report.format_text())
        reports.append(report)
        if args.fail_fast and report.drift:
            break
    code = exit_code(reports)
    if any(r.other_machine for r in reports):
        print(record_hint(directory, *_hint_commands(args, reports)))
    if len(reports) > 1:
        print(f"\nall: {len(reports)} candidates, {sum(r.checked for r in reports)} cases checked, "
              f"{sum(len(r.drift) for r in reports)} drift, "
              + (f"{sum(len(r.not_recorded) for r in reports)} not recorded (not checked), "
                 if any(r.not_recorded for r in reports) else "")
              + f"{sum(1 for r in reports if r.incomparable)} candidate(s) not fully comparable: "
              + {0: "same bits", 1: "DRIFT", 2: "CANNOT COMPARE"}[code])
    return code


def _hint_commands(args, reports) -> tuple[str, str]:
    """(the check command the user ran, without --golden; options narrowing the recording to it)."""
    command = "optparity reference check" if getattr(args, "reference_command", None) else "optparity check"
    level = getattr(args, "level", None)
    level_option = f" --level {level}" if level not in (None, "default") else ""
    if getattr(args, "all", False):
        return f"{command} --all{level_option}", level_option
    algos = sorted({a for r in reports if (a := _algorithm_of(r))})
    record = (f" --algorithms {','.join(algos)}" if algos else "") + level_option
    return f"{command} --candidate {args.candidate}" + (f" --reference {args.reference}" if args.reference else "") \
        + level_option, record


def _algorithm_of(report) -> str | None:
    from optparity.harness.algorithms import canonical_name

    return canonical_name(report.reference.rpartition(":")[2].rpartition(".")[2])


def _run_record(args) -> int:
    from optparity.harness import levels
    from optparity.harness.algorithms import ALGORITHMS

    unknown = [a for a in args.algorithms or () if a not in ALGORITHMS]
    if unknown:
        print(f"optparity reference record: unknown algorithm(s) {', '.join(unknown)}; known: "
              f"{', '.join(ALGORITHMS)}", file=sys.stderr)
        return 2
    native = forced_capability()
    if native:  # its goldens would match no machine, and check --golden refuses forced runs anyway
        print(f"optparity reference record: ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} forces "
              f"{environment()['cpu_capability']} on a {native} CPU, which reproduces no machine's bits; record "
              f"without it: env -u ATEN_CPU_CAPABILITY optparity reference record ...", file=sys.stderr)
        return 2
    dtypes = tuple(levels.DTYPE_NAMES[d] for d in args.dtypes) if args.dtypes else None

    def cases_for(algo):
        return levels.select(args.level, algo, paths=args.paths, dtypes=dtypes, param_sets=args.param_sets,
                             steps=args.steps)

    start = time.perf_counter()

    def progress(reference: str, path: Path, count: int):
        print(f"{reference:60s} {count:5d} cases -> {path}", flush=True)

    written = record(Path(args.out), args.algorithms, cases_for=cases_for, steps=args.steps or matrix.STEPS,
                     functional=not args.no_functional, workers=args.workers, progress=progress)
    env = environment()
    print(f"recorded {len(written)} files in {time.perf_counter() - start:.1f} s on torch {env['torch']}, "
          f"{env['platform']}, CPU capability {env['cpu_capability']}")
    return 0


def add_parsers(sub, csv, positive_int) -> None:
    """`optparity reference record` and `optparity reference check`."""
    from optparity.harness.algorithms import ALGORITHMS
    from optparity.harness.levels import DTYPE_NAMES, LEVELS

    dtype_names = list(DTYPE_NAMES)
    p = sub.add_parser("reference", help="golden fingerprints of torch.optim: record them, check against them",
                       description="Record per-step fingerprints of torch.optim (and torch.distributed.optim's "
                                   "functional optimizers) over the case matrix, or check a candidate against "
                                   "recorded ones without that torch installed.")
    rsub = p.add_subparsers(dest="reference_command", required=True)
    r = rsub.add_parser("record", help="record golden fingerprints from the installed torch",
                        description="Run every reference over the case matrix and write one text file per "
                                    "reference (default reference/golden/). Exit 0 written; 2 bad input, or "
                                    "ATEN_CPU_CAPABILITY forces a capability narrower than the CPU's.")
    r.add_argument("--out", default=str(DEFAULT_DIR), metavar="DIR", help="default: %(default)s")
    r.add_argument("--algorithms", type=csv(list(ALGORITHMS)), help="default: all")
    r.add_argument("--level", choices=list(LEVELS), default="default", help="which cases (default: default)")
    r.add_argument("--paths", type=csv(matrix.PATHS))
    r.add_argument("--dtypes", type=csv(dtype_names))
    r.add_argument("--param-sets", type=csv(matrix.PARAM_SETS))
    r.add_argument("--steps", type=positive_int)
    r.add_argument("-n", "--workers", type=positive_int, help="processes (default: the CPU count)")
    r.add_argument("--no-functional", action="store_true",
                   help="torch.optim only, not torch.distributed.optim's functional classes")
    r.set_defaults(func=_run_record)
    c = rsub.add_parser("check", help="check candidates against recorded fingerprints (= optparity check --golden)",
                        epilog="exit codes: 0 every fingerprint matches; 1 drift (case, first differing step and "
                               "tensor named); 2 cannot compare (another CPU capability or platform, case ids "
                               "unknown to this matrix, changed inputs, no golden file)")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--candidate", metavar="MODULE:NAME")
    what.add_argument("--all", action="store_true", help="every optparity optimizer, kernel and Functional* class")
    c.add_argument("--reference", metavar="MODULE:NAME", help="default: torch.optim's class of the same name")
    c.add_argument("--algorithm", choices=ALGORITHMS, metavar="NAME")
    c.add_argument("--golden", default=str(DEFAULT_DIR), metavar="DIR", help="default: %(default)s")
    c.add_argument("--level", choices=list(LEVELS), default="default",
                   help="quick/full: only the recorded cases of that level (default: every recorded case)")
    c.add_argument("--paths", type=csv(matrix.PATHS))
    c.add_argument("--dtypes", type=csv(dtype_names))
    c.add_argument("--param-sets", type=csv(matrix.PARAM_SETS))
    c.add_argument("--filter", dest="case_filter", metavar="TEXT")
    c.add_argument("--fail-fast", action="store_true")
    c.add_argument("--threads", type=positive_int, default=1)
    c.set_defaults(func=run_golden_check)


def refuse_with_golden(args) -> int:
    """Options of `optparity check` that have no meaning against fingerprints: exit 2 naming them."""
    given = [flag for flag, on in (("--hyper", getattr(args, "hyper", None)), ("--numerics-only", getattr(args, "numerics_only", False)),
                                   ("--max-ulp", getattr(args, "max_ulp", None) is not None),
                                   ("--steps", getattr(args, "steps", None) is not None),
                                   ("--json", getattr(args, "json", None)), ("--junit", getattr(args, "junit", None)),
                                   ("--html", getattr(args, "html", None))) if on]
    if given:
        print(f"optparity check: {', '.join(given)} cannot be used with --golden (the goldens fix the cases, "
              "steps and hyperparameters, and are compared bit for bit)", file=sys.stderr)
        return 2
    return 0
