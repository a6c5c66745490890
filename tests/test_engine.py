"""The check engine (harness/check.py): worker processes, the per-case watchdog, results as they
come in, Ctrl-C, levels, and the exit-code contract of `optparity check`."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET

import pytest

from optparity.harness import levels, matrix
from optparity.harness.check import UsageError, check, prepare
from optparity.harness.mutants import by_name

# A candidate that is torch's SGD except that its 3rd step hangs on the for-loop path: every
# forloop case must come back "hung in step 3" and every foreach one bit-identical. The hang ends
# (in an error, so a verdict other than "hung") only if nothing killed it for 10 minutes: a test
# proves the kill by the verdict, not by how long the run took.
HANGING = textwrap.dedent("""
    import time
    import torch

    class SGD(torch.optim.SGD):
        def step(self, closure=None):
            self._calls = getattr(self, "_calls", 0) + 1
            if self._calls == 3 and self.param_groups[0]["foreach"] is False:
                end = time.monotonic() + 600
                while time.monotonic() < end:
                    time.sleep(0.05)
                raise RuntimeError("the watchdog did not stop this hung step")
            return super().step(closure)
""")

# torch's Adam, whose foreach cases never finish: each marks that it is running (a file named after
# its worker) and then waits for a file that never comes. The for-loop cases finish. A test that
# waits for a marker and a partial report stops a run KNOWN to be in the middle, whatever the
# machine's speed or load (no sleep decides it). The marker is written at the first step, before
# the wait, so the case is running when the test sees it.
BLOCKING = textwrap.dedent("""
    import os, time
    import torch

    class Adam(torch.optim.Adam):
        def step(self, closure=None):
            if self.param_groups[0]["foreach"]:
                here = os.environ["OPTPARITY_TEST_BLOCK_DIR"]
                open(os.path.join(here, f"running.{os.getpid()}"), "w").close()
                while not os.path.exists(os.path.join(here, "never")):
                    time.sleep(0.01)
            return super().step(closure)
""")


def _module(tmp_path, name, source):
    (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def _exec_class(source, name):
    """A class from an in-memory module, as the mutants are built: not picklable."""
    namespace = {"__name__": "optparity_test_in_memory"}
    exec(compile(source, "<test>", "exec"), namespace)  # noqa: S102
    return namespace[name]


def _cli(*args, cwd, extra_path=None, **popen):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return [sys.executable, "-m", "optparity", "check", *args], dict(env=env, cwd=cwd, **popen)


def run_cli(*args, cwd, extra_path=None, timeout=300):
    cmd, kw = _cli(*args, cwd=cwd, extra_path=extra_path)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _summary(report):
    return [(r.case.id, r.verdict, r.steps_run, r.worst_ulp, r.message) for r in report.results]


# --- workers ----------------------------------------------------------------------------------

def test_two_workers_give_the_results_and_order_of_one():
    mutant = by_name("adam_eps_inside_sqrt").build()  # exec'd class: workers must be forked
    cases = levels.select("quick", "Adam")[:16]
    one = check(mutant, "torch.optim:Adam", cases=cases, workers=1)
    two = check(mutant, "torch.optim:Adam", cases=cases, workers=2)
    assert [r.case.id for r in one.results] == [c.id for c in cases]
    assert _summary(two) == _summary(one)
    assert one.failed and not one.ok and not two.ok  # the mutant is caught either way
    assert two.finished and len(two.results) == two.planned == len(cases)


def test_fail_fast_stops_at_the_same_case_whatever_the_workers():
    mutant = by_name("adam_eps_inside_sqrt").build()
    quick = levels.select("quick", "Adam")
    # Workers take edge-axis cases first: the later, failing ones are seen before earlier cases.
    passing = [c for c in quick[:12] if check(mutant, "torch.optim:Adam", cases=[c]).ok][:4]
    failing = [c for c in quick[:12] if not check(mutant, "torch.optim:Adam", cases=[c]).ok][:1]
    cases = passing + failing + [c for c in quick if levels.axis_of(c) != "base"][:3]
    one = check(mutant, "torch.optim:Adam", cases=cases, fail_fast=True)
    two = check(mutant, "torch.optim:Adam", cases=cases, fail_fast=True, workers=2)
    assert len(one.results) == 5
    assert _summary(two) == _summary(one)
    assert one.results[-1].status == "fail" and all(r.status != "fail" for r in one.results[:-1])


# torch's SGD, logging when each of its optimizers is built and last stepped, and on how many threads
LOGGING = textwrap.dedent("""
    import os, time
    import torch

    class SGD(torch.optim.SGD):
        def step(self, closure=None):
            with open(os.environ["OPTPARITY_TEST_LOG"], "a") as log:
                log.write(f"{id(self)} {os.getpid()} {torch.get_num_threads()} {time.monotonic()}\\n")
            return super().step(closure)
""")


def test_cases_on_several_threads_run_alone(tmp_path, monkeypatch):
    # beside another worker their threads would outnumber the cores (and every case slows down)
    log = tmp_path / "log"
    monkeypatch.setenv("OPTPARITY_TEST_LOG", str(log))
    cls = _exec_class(LOGGING, "SGD")
    cases = [c for c in levels.select("default", "SGD", paths=["forloop"]) if c.threads > 1 or c.axis == "base"]
    threaded = [c for c in cases if c.threads > 1]
    assert threaded and len(cases) > len(threaded)
    # threaded ones first and several of them: the engine must hold them back and run them one by one
    cases = threaded * 3 + cases[:12]
    report = check(cls, "torch.optim:SGD", cases=cases, workers=2)
    assert report.ok and len(report.results) == len(cases)
    spans: dict[str, list] = {}
    for line in log.read_text().split("\n"):
        if line:
            key, pid, threads, t = line.split()
            spans.setdefault((key, pid, threads), [pid, int(threads), float(t), float(t)])[3] = float(t)
    solo = [s for s in spans.values() if s[1] > 1]
    assert solo, "no step ran on several threads"
    for pid, threads, start, end in solo:
        overlapping = [s for s in spans.values() if s[0] != pid and s[2] < end and s[3] > start]
        assert not overlapping, f"another worker stepped while a {threads}-thread case ran: {overlapping[0]}"


# the watchdog's limit per case: well above a healthy case's seconds on a loaded 2-core machine
# (3 s once flagged a slow bit-identical case as hung), far below the hang's 10 minutes
HUNG_AFTER = 15


def test_hung_case_is_reported_with_its_step_and_the_run_goes_on():
    cls = _exec_class(HANGING, "SGD")
    cases = [c for c in matrix.build_cases(["SGD"], ("forloop", "foreach"), (matrix.DTYPES[0],), ("mixed",))
             if c.config_index in (0, 1) and levels.axis_of(c) == "base"]
    assert [c.path for c in cases] == ["forloop", "foreach", "forloop", "foreach"]
    report = check(cls, "torch.optim:SGD", cases=cases, workers=2, timeout=HUNG_AFTER)
    verdicts = [(r.case.path, r.verdict) for r in report.results]
    # "hung", not the error the step raises if left alone: the watchdog killed it
    assert verdicts == [("forloop", "hung"), ("foreach", "bit_identical")] * 2
    hung = report.results[0]
    assert hung.hung_step == 3 and "hung in step 3" in hung.message and hung.status == "fail"
    assert report.finished and not report.ok


def test_timeout_with_one_worker_still_runs_in_a_watched_process():
    cls = _exec_class(HANGING, "SGD")
    case = next(c for c in matrix.build_cases(["SGD"], ("forloop",), (matrix.DTYPES[0],), ("mixed",))
                if levels.axis_of(c) == "base")
    report = check(cls, "torch.optim:SGD", cases=[case, case], workers=1, timeout=2)
    assert [r.verdict for r in report.results] == ["hung", "hung"]  # the replaced worker ran the second


# --- levels -----------------------------------------------------------------------------------

def test_levels_nest_and_quick_covers_every_configuration_and_path():
    quick, default, full = (levels.select(n, "Adam") for n in ("quick", "default", "full"))
    ids = [{c.id for c in cs} for cs in (quick, default, full)]
    assert ids[0] < ids[1] < ids[2]
    base_quick = [c for c in quick if levels.axis_of(c) == "base"]
    assert {(c.config_index, c.path) for c in base_quick} == {
        (c.config_index, c.path) for c in default if levels.axis_of(c) == "base"}
    assert {c.dtype for c in base_quick} == {matrix.DTYPES[0]}
    assert {str(c.dtype) for c in full} >= {"torch.float16", "torch.bfloat16"}
    edge_default = {levels.axis_of(c) for c in default} - {"base"}
    assert {levels.axis_of(c) for c in quick} - {"base"} == edge_default  # one case per edge axis
    assert all(levels.cost_of(c) != "expensive" for c in default)


def test_unknown_level_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown --level 'nightly'"):
        prepare("optparity.optim:Adam", level="nightly")


# --- the command: results as they come in, kill -9, Ctrl-C ------------------------------------

BLOCKING_ARGS = ["--candidate", "blocking:Adam", "--paths", "forloop,foreach", "--param-sets", "mixed,groups",
                 "--json", "r.json", "--junit", "r.xml"]


def _start_blocking(tmp_path, **popen):
    """The BLOCKING candidate's run with 2 workers, in tmp_path."""
    _module(tmp_path, "blocking", BLOCKING)
    cmd, kw = _cli(*BLOCKING_ARGS, "-n", "2", cwd=tmp_path, extra_path=tmp_path)
    kw["env"]["OPTPARITY_TEST_BLOCK_DIR"] = str(tmp_path)
    return subprocess.Popen(cmd, **kw, **popen)


def _wait_until_blocked(tmp_path, proc, deadline_s=300):
    """Wait until a case is running (its marker exists) and the report holds some results: the
    run is then known to be unfinished. The deadline only bounds a broken run."""
    doc = _wait_for_partial(tmp_path / "r.json", proc, deadline_s)
    end = time.monotonic() + deadline_s
    while not list(tmp_path.glob("running.*")):
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < end, "no case started blocking"
        time.sleep(0.05)
    return doc


def _wait_for_partial(path, proc, deadline_s=120):
    """Wait until `path` holds a report with some (not all) results; return it."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert proc.poll() is None, "the run ended before it could be stopped"
        if path.exists():
            doc = json.loads(path.read_text())  # atomic rewrites: always valid
            if doc["cases"] > 0:
                return doc
        time.sleep(0.2)
    raise AssertionError("no partial report appeared")


def test_kill_9_leaves_a_valid_partial_report(tmp_path):
    proc = _start_blocking(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_blocked(tmp_path, proc)
        workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(workers) == 2
    deadline = time.monotonic() + 30
    while any(os.path.exists(f"/proc/{w}") and "Z" not in open(f"/proc/{w}/stat").read().split()[2]
              for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert time.monotonic() < deadline, "workers outlived their killed parent"
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["finished"] is False and doc["ok"] is False
    assert 0 < doc["cases"] == len(doc["results"]) < doc["planned"]
    assert {r["verdict"] for r in doc["results"]} <= {"bit_identical", "same_error"}, doc["results"]
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                           (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_gives_the_partial_summary_without_a_traceback(tmp_path, sig, code, said):
    # SIGINT at its default in the child: a process started in the background by a non-interactive
    # shell (a CI runner, `cmd &`) inherits SIGINT ignored, and Python then installs no Ctrl-C handler
    proc = _start_blocking(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_until_blocked(tmp_path, proc)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does: the workers get it too
        else:
            proc.send_signal(sig)  # as a CI runner's timeout does
        out, err = proc.communicate(timeout=600)  # a bound for a broken stop, not a speed claim
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"{said}: partial results" in out and "candidate: blocking:Adam" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["interrupted"] is True and doc["ok"] is False and 0 < doc["cases"] < doc["planned"]
    assert not list(tmp_path.glob(".r.json.partial"))


def test_hung_candidate_on_the_command_line(tmp_path):
    _module(tmp_path, "hang", HANGING)
    out = run_cli("--candidate", "hang:SGD", "--paths", "forloop,foreach", "--dtypes", "float32",
                  "--param-sets", "mixed", "--filter", r"/mixed/c[01]\[[^]]*\]$", "--timeout", str(HUNG_AFTER), "-n", "2",
                  "--json", "r.json", cwd=tmp_path, extra_path=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "hung in step 3" in out.stdout + out.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["verdict"] for r in doc["results"]] == ["hung", "bit_identical"] * 2
    assert doc["finished"] is True


# --- exit code 2, before any case runs ----------------------------------------------------------

BROKEN = "raise RuntimeError('no GPU found')\n"


@pytest.mark.parametrize("args,message", [
    (["--candidate", "broken:Adam"], "importing module 'broken'"),
    (["--candidate", "optparity.optim:Rprop", "--steps", "0"], "--steps: must be at least 1"),
    (["--candidate", "optparity.optim:Rprop", "--paths", "fused"], "Rprop has no fused CPU path (--paths fused)"),
    (["--candidate", "optparity.optim:Rprop", "--json", "/no/such/dir/x.json"],
     "--json /no/such/dir/x.json: directory /no/such/dir does not exist"),
    (["--candidate", "optparity.optim:Rprop", "--junit", "."], "--junit .: is a directory"),
    (["--candidate", "optparity.optim:Rprop", "--algorithm", "Lion"], "invalid choice: 'Lion'"),
    (["--candidate", "optparity.optim.NoSuch"], "has no attribute 'NoSuch'"),
    (["--candidate", "optparity.optim:Rprop", "--timeout", "-1"], "--timeout: must be 0"),
    (["--candidate", "optparity.optim:Rprop", "-n", "0"], "-n/--workers: must be at least 1"),
])
def test_usage_errors_exit_2_before_any_case(tmp_path, args, message):
    (tmp_path / "broken.py").write_text(BROKEN)
    out = run_cli(*args, cwd=tmp_path, extra_path=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "cases" not in out.stdout
    if "broken" in args[1]:
        assert "RuntimeError: no GPU found" in out.stderr


def test_unknown_algorithm_lists_every_algorithm_and_help_does_too(tmp_path):
    from optparity.harness.algorithms import ALGORITHMS

    out = run_cli("--candidate", "optparity.optim:Rprop", "--algorithm", "Lion", cwd=tmp_path)
    assert all(repr(a) in out.stderr for a in ALGORITHMS)
    helptext = run_cli("--help", cwd=tmp_path).stdout
    assert all(a in helptext for a in ALGORITHMS) and "--level" in helptext and "130" in helptext
    assert "143" in helptext


def test_dotted_candidate_and_default_output_directories(tmp_path):
    out = run_cli("--candidate", "optparity.optim.Rprop", "--level", "quick", "--filter", "forloop",
                  "--json", "reports/check/r.json", "-n", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cases/s" in out.stdout
    assert json.loads((tmp_path / "reports/check/r.json").read_text())["ok"] is True


def test_the_candidates_own_traceback_is_shown_once_per_kind(tmp_path):
    _module(tmp_path, "boom", textwrap.dedent("""
        import torch

        def _helper_that_breaks():
            raise RuntimeError("boom")

        class SGD(torch.optim.SGD):
            def step(self, closure=None):
                _helper_that_breaks()
    """))
    out = run_cli("--candidate", "boom:SGD", "--paths", "forloop", "--dtypes", "float32", "--param-sets", "mixed",
                  "--filter", r"/c[01]\[[^]]*\]$", "-n", "1", cwd=tmp_path, extra_path=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.count("traceback, first RuntimeError") == 1  # two failing cases, one kind
    assert "_helper_that_breaks" in out.stdout and "RuntimeError: boom" in out.stdout


def test_workers_are_not_forked_where_openmp_would_hang_them(tmp_path):
    # A process forked after its parent ran an OpenMP parallel region hangs in its own first one;
    # multi-threaded cases (the threads axis) must then run in-process instead of "hanging".
    script = textwrap.dedent("""
        import warnings, torch
        from optparity.harness import levels
        from optparity.harness.check import check
        cases = [c for c in levels.select("full", "SGD") if getattr(c, "threads", 1) > 1][:1]
        assert cases, "no multi-threaded case in the matrix"
        torch.set_num_threads(2)
        (torch.randn(1 << 20) * 2).sum()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = check("optparity.optim:SGD", cases=cases, workers=2, timeout=30)
        print([r.verdict for r in report.results], any("OpenMP" in str(w.message) for w in caught))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['bit_identical'] True", out.stdout + out.stderr
