"""optparity on the torch the user runs: every report says which torch it compared against, optparity
says which release its implementations mirror, a difference on another release is reported as
version drift (never a pass, never a crash), and torch's test configurations are read from the
installed torch when it is not the mirrored release."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

import optparity
from optparity import versions
from optparity.harness import levels, matrix, torch_tests
from optparity.harness.check import check
from optparity.harness.html import write_html
from optparity.harness.mutants import by_name
from optparity.harness.report import format_text, version_drift, write_json, write_junit


def test_optparity_says_which_release_it_mirrors_and_supports():
    assert optparity.MIRRORS_TORCH == versions.MIRRORS_TORCH == "2.13"
    assert versions.release("2.15.0+cu130") == "2.15" and versions.release("2.11.0a0+git1234") == "2.11"
    assert versions.as_tuple("2.9") < versions.as_tuple("2.10")  # numbers, not text
    with pytest.raises(ValueError, match="not a torch version"):
        versions.release("nightly")
    info = versions.info()
    assert info["torch"] == torch.__version__ and info["optparity_mirrors_torch"] == "2.13"
    assert info["supported_range"] == ["2.11", "2.15"]


def test_pyproject_declares_the_supported_range_not_one_release():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if d.startswith("torch")]
    lo, hi = versions.SUPPORTED
    assert torch_dep == f"torch>={lo},<{hi.split('.')[0]}.{int(hi.split('.')[1]) + 1}"


def test_outside_the_supported_range_is_said(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert not versions.supported()
    assert "outside the supported 2.11 to 2.15" in versions.compared_against()


@pytest.fixture(scope="module")
def caught():
    """A failing report: the planted bug adam_eps_inside_sqrt against torch's Adam, a few cases."""
    cases = levels.select("quick", "Adam", paths=["forloop"])[:3]
    return check(by_name("adam_eps_inside_sqrt").build(), "torch.optim:Adam", cases=cases)


def test_every_report_says_which_torch_it_compared_against(caught, tmp_path):
    line = f"compared against: torch {torch.__version__} (installed)"
    assert line in format_text(caught) and "mirror torch 2.13" in format_text(caught)
    write_json(caught, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["torch"]["torch"] == torch.__version__
    write_json([caught, caught], tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text())["torch"]["optparity_mirrors_torch"] == "2.13"
    write_junit(caught, tmp_path / "r.xml")
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
             .find("properties")}
    assert props["torch"] == torch.__version__ and props["optparity_mirrors_torch"] == "2.13"
    # (the HTML page's line: in the version drift test, which writes one)


def _as_optparity(report):
    """The same results, as if optparity's own Adam had produced them."""
    import dataclasses

    return dataclasses.replace(report, candidate="optparity.optim:Adam")


def test_a_difference_on_a_release_optparity_does_not_mirror_is_version_drift(caught, monkeypatch, tmp_path):
    ours = _as_optparity(caught)
    monkeypatch.setattr(torch_tests, "note", lambda: None)  # the configurations' source: tested below
    monkeypatch.setattr(versions, "MIRRORS_TORCH", versions.release())
    assert not version_drift(ours)  # on the mirrored release a difference is a plain failure
    monkeypatch.setattr(versions, "MIRRORS_TORCH", "2.99")
    assert version_drift(ours) and not ours.ok  # reported, and still a failure: never a silent pass
    text = format_text(ours)
    first = ours.failed[0].case.id
    assert (f"VERSION DRIFT: optparity.optim:Adam mirrors torch 2.99, this is torch {torch.__version__}: "
            f"{len(ours.failed)} cases differ, first {first}: ") in text
    assert not version_drift(caught)  # someone else's optimizer differing is their difference
    write_json([ours, caught], tmp_path / "all.json")
    assert json.loads((tmp_path / "all.json").read_text())["version_drift"] == ["optparity.optim:Adam"]
    page = write_html(ours, tmp_path / "html").read_text()
    assert "VERSION DRIFT" in page and f"torch {torch.__version__} (installed)" in page


# --- torch's test configurations, from the installed torch ------------------------------------------

def test_on_the_mirrored_release_the_matrix_is_the_descriptions(monkeypatch):
    monkeypatch.setattr(versions, "MIRRORS_TORCH", versions.release())
    monkeypatch.setattr(torch_tests, "installed_configs", lambda *a: pytest.fail("read on the mirrored release"))
    assert matrix.configs("Adam") == matrix.spec("Adam").configs()
    assert torch_tests.note() is None


def test_configurations_new_in_the_installed_torch_run_after_ours(monkeypatch):
    before = {c.id: c.seed for c in matrix.build_cases(["Adam"], ("forloop",), (torch.float32,), ("mixed",))}
    monkeypatch.setattr(versions, "MIRRORS_TORCH", "2.99")
    known = matrix.spec("Adam").configs()
    new = {"lr": 0.5, "betas": (0.1, 0.2)}
    monkeypatch.setattr(torch_tests, "installed_configs",
                        lambda algo, device="cpu": [known[0], new] if algo == "Adam" else [])
    monkeypatch.setattr(torch_tests, "reason", lambda: None)
    cfgs = matrix.configs("Adam")
    assert cfgs == [*known, new]  # only the new one, after every existing configuration
    assert torch_tests.note().endswith("1 beyond torch 2.99's, run after them: Adam 1")
    after = {c.id: c.seed for c in matrix.build_cases(["Adam"], ("forloop",), (torch.float32,), ("mixed",))}
    assert {k: v for k, v in after.items() if k in before} == before  # existing ids and seeds unchanged
    assert [k for k in after if k not in before] and all("lr=0.5" in k for k in after if k not in before)


def test_unreadable_torch_tests_are_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(versions, "MIRRORS_TORCH", "2.99")
    monkeypatch.setattr(torch_tests, "_READER", "raise SystemExit('ModuleNotFoundError: expecttest')")
    torch_tests._read.cache_clear()
    try:
        assert matrix.configs("SGD") == matrix.spec("SGD").configs()
        note = torch_tests.note()
        assert "could not be read (ModuleNotFoundError: expecttest)" in note and "torch 2.99's" in note
    finally:
        torch_tests._read.cache_clear()


@pytest.mark.skipif(versions.mirrors_installed() and levels.suite_level() == "quick",
                    reason="on the mirrored release the matrix never reads them; OPTPARITY_TEST_LEVEL=default runs it")
def test_the_installed_torch_tests_are_read_in_a_child_and_cached(monkeypatch, tmp_path):
    pytest.importorskip("expecttest", reason="torch's test helpers need expecttest")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch_tests._read.cache_clear()
    try:
        adam = torch_tests.installed_configs("Adam")
        assert torch_tests.reason() is None and adam
        # reading them never imports torch's test helpers here (they freeze torch.backends' flags):
        # asked of a fresh process, since other tests in this worker import them on purpose
        probe = ("import sys, optparity; from optparity.harness import torch_tests; "
                 "assert torch_tests.installed_configs('Adam'); "
                 "print('torch.testing._internal.common_optimizers' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "fresh")})
        assert out.stdout.split()[-1] == "False", out.stdout + out.stderr
        assert (tmp_path / "optparity" / f"torch-test-configs-{torch.__version__}.pt").is_file()
        if versions.mirrors_installed():  # on the mirrored release they are the description's
            assert all(any(matrix.same_config(c, k) for k in matrix.spec("Adam").torch_configs) for c in adam)
    finally:
        torch_tests._read.cache_clear()


# --- where upstream's API changed after the mirrored release, optparity follows the installed one ----

def _outcome(fn):
    try:
        fn()
        return None
    except Exception as e:  # noqa: BLE001 - the error is what is compared
        return type(e), str(e)


def test_lbfgs_signature_and_maximize_follow_the_installed_torch():
    import inspect

    import optparity.optim

    ours, theirs = inspect.signature(optparity.optim.LBFGS), inspect.signature(torch.optim.LBFGS)
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == \
           [(p.name, p.kind, p.default) for p in theirs.parameters.values()]
    for kwargs in ({"maximize": True}, {"maximize": False}):  # a TypeError on 2.13, a group key on 2.14+
        outcomes = [_outcome(lambda cls=cls: cls([torch.zeros(2, requires_grad=True)], **kwargs))
                    for cls in (optparity.optim.LBFGS, torch.optim.LBFGS)]
        assert outcomes[0] == outcomes[1]
    # a group without parameters: 2.13 fails at the step (IndexError), 2.14+ returns the closure's loss
    empty = [_outcome(lambda cls=cls: cls([{"params": []}]).step(lambda: torch.tensor(1.0)))
             for cls in (optparity.optim.LBFGS, torch.optim.LBFGS)]
    assert empty[0] == empty[1]


def test_muon_adjust_lr_fns_follow_the_installed_torch():
    import optparity.optim

    for fn in ("original", "match_rms_adamw", "spectral_unclamped", "nonsense"):
        outcomes = [_outcome(lambda cls=cls: cls([torch.zeros(3, 2, requires_grad=True)], adjust_lr_fn=fn))
                    for cls in (optparity.optim.Muon, torch.optim.Muon)]
        assert outcomes[0] == outcomes[1], fn


def test_the_command_says_its_version_and_the_torch_it_checks_against(capsys):
    from optparity.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"optparity {optparity.__version__}; checks against torch {torch.__version__} (installed)")
