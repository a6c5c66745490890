"""`optparity check` and `optparity selftest` as a user and a CI job see them."""
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

QUICK = ["--paths", "forloop", "--dtypes", "float32", "--param-sets", "mixed,groups"]


def run(*args, tmp_path=None, extra_path=None):
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "optparity", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)


@pytest.fixture
def buggy_module(tmp_path):
    # A hand-written bug, independent of the mutant catalogue: lr off by one part in 10^6.
    (tmp_path / "buggy.py").write_text(textwrap.dedent("""
        import optparity.functional

        def sgd(*args, lr, **kwargs):
            return optparity.functional.sgd(*args, lr=lr * (1 + 1e-6), **kwargs)
    """))
    return tmp_path


def test_identical_candidate_exits_zero_and_writes_reports(tmp_path):
    out = run("check", "--candidate", "optparity.optim:Rprop", *QUICK, "--json", "r.json", "--junit", "r.xml",
              tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 differ" in out.stdout and "worst ULP distance 0" in out.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["ok"] is True and doc["failed"] == 0 and doc["cases"] == len(doc["results"]) > 0
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) == doc["cases"] and suite.get("failures") == "0"


def test_planted_bug_exits_one_with_first_divergence(buggy_module):
    out = run("check", "--candidate", "buggy:sgd", "--reference", "torch.optim:SGD", *QUICK,
              "--json", "r.json", "--junit", "r.xml", tmp_path=buggy_module, extra_path=buggy_module)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FIRST DIVERGENCE: SGD/forloop/float32/mixed/c0[defaults]" in out.stdout
    assert "step 1, param" in out.stdout and "ulp=" in out.stdout
    doc = json.loads((buggy_module / "r.json").read_text())
    first = next(r for r in doc["results"] if r["status"] == "fail")["first_divergence"]
    assert first["step"] == 1 and first["where"] == "param"
    assert first["candidate"] != first["reference"] and first["ulp"] >= 1 and first["abs_error"] > 0
    assert first["element"] is not None
    failures = ET.parse(buggy_module / "r.xml").getroot().iter("failure")
    assert len(list(failures)) == doc["failed"] > 0


def test_functional_class_candidate_is_understood():
    out = run("check", "--candidate", "torch.distributed.optim.functional_sgd:_FunctionalSGD", *QUICK)
    assert "reference: torch.optim:SGD" in out.stdout
    assert out.returncode in (0, 1), out.stderr  # upstream's conformance is reported, not assumed


@pytest.mark.parametrize("spec,message", [
    ("no.such.module:Adam", "cannot import module 'no.such.module'"),
    ("optparity.optim:NoSuchThing", "has no attribute 'NoSuchThing'"),
    ("optparity.optim", "expected MODULE:NAME"),
    ("collections:OrderedDict", "OrderedDict has no step() method"),
    # (was torch.optim:LBFGS, which optparity now implements)
    ("torch.optim:Optimizer", "cannot tell which torch.optim class"),
])
def test_bad_candidate_is_a_usage_error(spec, message):
    out = run("check", "--candidate", spec)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_bad_option_values_are_refused():
    out = run("check", "--candidate", "optparity.optim:SGD", "--paths", "warp")
    assert out.returncode == 2 and "warp not in" in out.stderr


def test_selftest_catches_named_mutants():
    out = run("selftest", "--mutant", "adam_eps_inside_sqrt", "--mutant", "rprop_zero_counts_as_positive")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2/2 mutants caught" in out.stdout


def test_all_writes_one_json_and_one_junit(tmp_path):
    import re

    from optparity.cli import _all_candidates

    # The candidate count grows with every algorithm added (23 when this test was written: kernels
    # that are their class's kernel are covered by the class); those the options select no case
    # of are named and left out, not counted as passing.
    out = run("check", "--all", "--level", "quick", "--paths", "forloop", "--dtypes", "float64",
              "--param-sets", "groups", "-q", "--json", "all.json", "--junit", "all.xml", tmp_path=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    n = int(re.search(r"^all: (\d+) candidates, \d+ cases, 0 differ", out.stdout, re.M).group(1))
    skipped = out.stdout.count("no case to run") and len(out.stdout.split("no case to run for: ")[1].split("; "))
    assert n >= 18 and n + skipped == len(_all_candidates())
    doc = json.loads((tmp_path / "all.json").read_text())
    assert doc["ok"] is True and len(doc["reports"]) == n
    assert doc["cases"] == sum(r["cases"] for r in doc["reports"]) > 0
    suites = ET.parse(tmp_path / "all.xml").getroot().findall("testsuite")
    assert len(suites) == n and sum(int(s.get("tests")) for s in suites) == doc["cases"]


def test_all_leaves_out_only_kernels_that_are_their_class_kernel(monkeypatch):
    import optparity.functional
    import optparity.optim
    from optparity.cli import _all_candidates, _covered_kernels
    from optparity.harness.algorithms import ALGORITHMS

    covered = dict(_covered_kernels())
    for kernel, cls in covered.items():
        algo = cls.split(":")[1]
        assert getattr(optparity.optim, algo).kernel is getattr(optparity.functional, algo.lower())
        assert (cls, f"torch.optim:{algo}") in _all_candidates()
    assert len(covered) == len(ALGORITHMS)
    # a class that steps with other code than the kernel: the kernel is checked on its own
    monkeypatch.setattr(optparity.optim.Adam, "kernel", staticmethod(lambda *a, **k: None))
    assert ("optparity.functional:adam", "torch.optim:Adam") in _all_candidates()


def test_functional_classes_default_to_upstreams_functional_reference():
    # as check --all pairs them (and --golden then reads that reference's goldens)
    from optparity.harness.check import prepare

    assert prepare("optparity.distributed:FunctionalAdam", level="quick").reference.label == \
        "torch.distributed.optim.functional_adam:_FunctionalAdam"
    assert prepare("optparity.optim:Adam", level="quick").reference.label == "torch.optim:Adam"
    assert prepare("optparity.distributed:FunctionalAdam", "torch.optim:Adam", level="quick").reference.label == \
        "torch.optim:Adam"


def test_json_and_junit_of_several_reports_are_the_plain_documents(tmp_path):
    # finished reports are serialised once and reused (check --all rewrites its outputs often)
    from optparity import versions
    from optparity.harness import report as rp
    from optparity.harness.check import check

    reps = [check("optparity.optim:SGD", level="quick", paths=["forloop"], param_sets=["groups"]),
            check("optparity.optim:Adam", level="quick", paths=["foreach"], param_sets=["groups"])]
    unfinished = reps[0].__class__(reps[1].candidate, reps[1].reference, results=list(reps[1].results[:3]))
    for docs in (reps, reps + [unfinished]):
        for _ in range(2):
            rp.write_json(docs, tmp_path / "r.json")
        want = {"ok": all(r.ok for r in docs), "torch": versions.info(), "version_drift": [],
                "cases": sum(len(r.results) for r in docs),
                "failed": sum(len(r.failed) for r in docs),
                "counts": rp.counts([x for r in docs for x in r.results]), "reports": [rp.report_doc(r) for r in docs]}
        assert json.loads((tmp_path / "r.json").read_text()) == json.loads(json.dumps(want, default=str))
        rp.write_junit(docs, tmp_path / "r.xml")
        suites = ET.parse(tmp_path / "r.xml").getroot().findall("testsuite")
        assert [int(s.get("tests")) for s in suites] == [len(r.results) for r in docs]
    unfinished.results.append(reps[1].results[3])  # still running: never cached
    rp.write_json([unfinished], tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["cases"] == 4
