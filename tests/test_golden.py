"""Golden fingerprints: recorded from torch.optim, deterministic, and checked so that a changed
fingerprint is drift (exit 1, case, step and tensor named) while a recording from another CPU
capability or matrix version cannot be compared (exit 2), never drift."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from optparity.cli import main
from optparity.harness import golden, levels, matrix
from optparity.harness.mutants import by_name


def _cases(algo, configs=None):
    cases = matrix.build_cases([algo], ("forloop",), (torch.float32,), ("mixed",))
    base = [c for c in cases if (getattr(c, "axis", None) or "base") == "base"]  # no edge-condition cases
    return [c for c in base if configs is None or c.config_index in configs]


def _record(out, algo="SGD", configs=None, env=None):
    return golden.record(out, [algo], cases_for=lambda a: _cases(a, configs), functional=False, env=env,
                         workers=1)


@pytest.fixture(scope="module")
def sgd_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    _record(out, "SGD", configs={0, 4, 8})  # defaults, momentum, nesterov + weight decay
    return out


def test_record_is_deterministic_and_readable(sgd_dir, tmp_path):
    _record(tmp_path, "SGD", configs={0, 4, 8})
    first, again = (sgd_dir / "SGD.txt").read_text(), (tmp_path / "SGD.txt").read_text()
    assert first == again
    g = golden.read_golden(sgd_dir / "SGD.txt")
    assert g.reference == "torch.optim:SGD" and g.env == golden.environment()
    assert len(g.cases) == 3 and all(len(c.steps) == matrix.STEPS + 1 for c in g.cases.values())
    momentum = next(c for c in g.cases.values() if "momentum=0.9" in c.case_id)
    assert "matrix.momentum_buffer" in momentum.entries and "loss" in momentum.entries


def test_fingerprint_sees_bits_not_strides():
    x = torch.randn(4, 6)
    assert golden.digest(x[:, ::2]) == golden.digest(x[:, ::2].contiguous())
    assert golden.digest(torch.tensor([0.0])) != golden.digest(torch.tensor([-0.0]))
    assert golden.digest(x) != golden.digest(x.double()) and golden.digest(x) != golden.digest(x.reshape(6, 4))
    nan_a = torch.tensor([float("nan")])
    nan_b = torch.tensor([-0x3FFFFF], dtype=torch.int32).view(torch.float32)  # another NaN payload, sign set
    assert torch.isnan(nan_b).all() and golden.digest(nan_a) == golden.digest(nan_b)


def test_optparity_matches_the_goldens(sgd_dir):
    for candidate in ("optparity.optim:SGD", "optparity.functional:sgd"):
        report = golden.check_against(candidate, sgd_dir)
        assert report.exit_code == 0, report.format_text()
        assert report.checked == report.matched == 3


def test_a_planted_bug_is_drift_naming_case_step_and_tensor(sgd_dir):
    report = golden.check_against(by_name("sgd_nesterov_swapped").build(), sgd_dir, "torch.optim:SGD")
    assert report.exit_code == 1
    (drift,) = report.drift
    assert "nesterov=True" in drift.case_id and drift.step == 2  # step 1: the buffer is the gradient
    assert "matrix" in drift.tensors and "matrix.momentum_buffer" not in drift.tensors


def _alter(path, case_id, step, entry_index=None, new_error=None):
    lines = path.read_text().splitlines()
    at = lines.index(f"case {case_id}")
    for i in range(at + 1, len(lines)):
        parts = lines[i].split(" ")
        if lines[i].startswith(f"  {step} "):
            if new_error is not None:
                lines[i] = " ".join(parts[:4]) + f' raised "{new_error}"'
            else:
                parts[4] = "0" * len(parts[4])  # the step digest
                short = parts[5]
                j = 2 * entry_index
                parts[5] = short[:j] + ("00" if short[j:j + 2] != "00" else "11") + short[j + 2:]
                lines[i] = " ".join(parts)
            break
    path.write_text("\n".join(lines) + "\n")


def test_altered_line_is_drift_in_the_cli(sgd_dir, tmp_path, capsys):
    (tmp_path / "SGD.txt").write_text((sgd_dir / "SGD.txt").read_text())
    g = golden.read_golden(tmp_path / "SGD.txt")
    case_id = sorted(g.cases)[1]
    entry = g.cases[case_id].entries.index("grad_with_zeros")
    _alter(tmp_path / "SGD.txt", case_id, 5, entry)
    code = main(["check", "--candidate", "optparity.optim:SGD", "--golden", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"DRIFT {case_id}: step 5: differs: grad_with_zeros" in out
    assert "1 drift" in out


def test_other_cpu_capability_cannot_be_compared(tmp_path, capsys):
    fake = {**golden.environment(), "cpu_capability": "AVX512_FAKE"}
    _record(tmp_path, "SGD", configs={0}, env=fake)
    report = golden.check_against("optparity.optim:SGD", tmp_path)
    assert report.exit_code == 2 and not report.drift and report.checked == 0
    assert "cpu_capability 'AVX512_FAKE'" in report.incomparable[0] and "not drift" in report.incomparable[0]
    assert main(["reference", "check", "--candidate", "optparity.optim:SGD", "--golden", str(tmp_path)]) == 2
    assert "CANNOT COMPARE" in capsys.readouterr().out


def test_header_edited_to_another_platform_cannot_be_compared(sgd_dir, tmp_path):
    text = (sgd_dir / "SGD.txt").read_text()
    (tmp_path / "SGD.txt").write_text(re.sub(r"^platform .*$", "platform Darwin-arm64", text, flags=re.M))
    report = golden.check_against("optparity.optim:SGD", tmp_path)
    assert report.exit_code == 2 and "platform 'Darwin-arm64'" in report.incomparable[0]


def test_unknown_case_ids_cannot_be_compared(sgd_dir, tmp_path):
    text = (sgd_dir / "SGD.txt").read_text()
    first = sorted(golden.read_golden(sgd_dir / "SGD.txt").cases)[0]
    (tmp_path / "SGD.txt").write_text(text.replace(f"case {first}\n", f"case {first}_from_a_newer_matrix\n"))
    report = golden.check_against("optparity.optim:SGD", tmp_path)
    assert report.exit_code == 2 and not report.drift and report.matched == 2
    assert "unknown to this version of the case matrix" in report.incomparable[0]


def test_cases_the_goldens_lack_are_named_not_failed(sgd_dir, capsys):
    # goldens recorded by an older (here: narrower) matrix: the level's cases they lack cannot be
    # checked; the check says how many and how to re-record, and what was recorded still decides
    narrow = ["--paths", "forloop", "--dtypes", "float32", "--param-sets", "mixed"]
    assert main(["check", "--candidate", "optparity.optim:SGD", "--golden", str(sgd_dir), *narrow]) == 0
    out = capsys.readouterr().out
    recorded = set(golden.read_golden(sgd_dir / "SGD.txt").cases)
    lacking = {c.id for c in levels.select("default", "SGD", paths=("forloop",), dtypes=(torch.float32,),
                                           param_sets=("mixed",))} - recorded
    assert lacking and f"NOT RECORDED: {len(lacking)} case(s) of the default level are not in SGD.txt" in out
    assert "optparity reference record" in out and "3 cases checked, 3 match, 0 drift" in out
    report = golden.check_against(by_name("sgd_nesterov_swapped").build(), sgd_dir, "torch.optim:SGD",
                                  level="default", paths=("forloop",), dtypes=(torch.float32,), param_sets=("mixed",))
    assert report.exit_code == 1 and len(report.not_recorded) == len(lacking)  # drift still fails


def test_errors_are_fingerprints(tmp_path):
    capturable = next(c.config_index for c in _cases("Adam") if c.config.get("capturable"))
    _record(tmp_path, "Adam", configs={0, capturable})
    g = golden.read_golden(tmp_path / "Adam.txt")
    case_id = next(cid for cid in g.cases if "capturable" in cid)
    step, _, what, text = g.cases[case_id].steps[-1]  # torch refuses capturable on CPU at the first step
    assert (step, what) == (1, "raised") and "capturable=True" in text
    assert golden.check_against("optparity.optim:Adam", tmp_path).exit_code == 0
    _alter(tmp_path / "Adam.txt", case_id, 1, new_error="AssertionError: another message")
    report = golden.check_against("optparity.optim:Adam", tmp_path)
    assert report.exit_code == 1 and report.drift[0].case_id == case_id and report.drift[0].step == 1
    assert "another message" in report.drift[0].message


def test_malformed_file_is_a_clear_error(tmp_path):
    (tmp_path / "SGD.txt").write_text("reference torch.optim:SGD\ncase X\n  1 2\n")
    report = golden.check_against("optparity.optim:SGD", tmp_path)
    assert report.exit_code == 2 and "SGD.txt:3" in report.incomparable[0]


def test_check_refuses_options_that_mean_nothing_against_goldens(sgd_dir, capsys):
    assert main(["check", "--candidate", "optparity.optim:SGD", "--golden", str(sgd_dir), "--max-ulp", "2"]) == 2
    assert "--max-ulp cannot be used with --golden" in capsys.readouterr().err


def test_record_command(tmp_path, capsys):
    code = main(["reference", "record", "--out", str(tmp_path), "--algorithms", "Rprop", "--paths", "forloop",
                 "--dtypes", "float64", "--param-sets", "groups", "--steps", "3", "-n", "1"])
    assert code == 0 and {p.name for p in tmp_path.iterdir()} == {"Rprop.txt", "FunctionalRprop.txt"}
    g = golden.read_golden(tmp_path / "FunctionalRprop.txt")
    base = [c for c in g.cases.values() if c.case_id.endswith("]")]  # edge-condition ids carry a suffix
    assert g.reference.endswith(":_FunctionalRprop") and base and all(c.n_steps == 3 for c in base)
    assert main(["check", "--candidate", "optparity.distributed:FunctionalRprop", "--reference", g.reference,
                 "--golden", str(tmp_path)]) == 0


# --- goldens off the recording machine: one line says how to record this machine's -------------

def _hint_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "optparity reference record --out" in line]


def test_another_machine_gets_one_line_with_the_commands_that_work(sgd_dir, monkeypatch, capsys):
    # a machine of another ATen CPU capability, faked: torch's own answer is patched
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_FAKE")
    narrow = ["--paths", "forloop", "--dtypes", "float32", "--param-sets", "mixed"]
    assert main(["check", "--candidate", "optparity.optim:SGD", "--golden", str(sgd_dir), *narrow]) == 2
    out = capsys.readouterr().out
    (hint,) = _hint_lines(out)  # one line, however many candidates were refused
    assert "AVX512_FAKE" in hint and "not drift" in out
    record, check = re.findall(r"`([^`]+)`", hint)
    target = sgd_dir.with_name(f"{sgd_dir.name}-{golden.environment()['platform']}-avx512_fake".lower())
    assert record == f"optparity reference record --out {target} --algorithms SGD"
    assert check == f"optparity check --candidate optparity.optim:SGD --golden {target}"
    # the two commands, as printed (narrowed to a few cases to stay quick), do what the line says
    assert main([*record.split()[1:], *narrow, "--no-functional", "-n", "1"]) == 0
    assert golden.read_golden(target / "SGD.txt").env["cpu_capability"] == "AVX512_FAKE"
    assert main([*check.split()[1:], *narrow]) == 0


def test_check_all_on_another_machine_prints_the_line_once(sgd_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_FAKE")
    assert main(["reference", "check", "--all", "--golden", str(sgd_dir), "--level", "quick"]) == 2
    (hint,) = _hint_lines(capsys.readouterr().out)
    assert "--level quick`, then run `optparity reference check --all --level quick --golden " in hint


def test_a_forced_capability_is_not_a_machine_of_that_capability(sgd_dir, monkeypatch, capsys):
    # ATEN_CPU_CAPABILITY=avx2 on an AVX512 CPU (faked: the child's answer is patched) narrows ATen's
    # dispatch only; such a run cannot stand in for an AVX2 machine
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(golden, "forced_capability", lambda: "AVX512")
    report = golden.check_against("optparity.optim:SGD", sgd_dir)
    assert report.exit_code == 2 and report.other_machine and report.checked == 0
    assert "ATEN_CPU_CAPABILITY=avx2 forces" in report.incomparable[0] and "AVX512 CPU" in report.incomparable[0]
    assert main(["check", "--candidate", "optparity.optim:SGD", "--golden", str(sgd_dir)]) == 2
    assert len(_hint_lines(capsys.readouterr().out)) == 1


def test_a_really_forced_capability_in_a_child_gets_commands_that_work(sgd_dir, tmp_path):
    # No patching: a child under ATEN_CPU_CAPABILITY=default (ATen's scalar kernels), checked against
    # goldens recorded here natively. The line's two commands, run as printed by a shell that still
    # has the variable set, record this machine's goldens and match them.
    native = torch.backends.cpu.get_cpu_capability()
    if native == "DEFAULT":
        pytest.skip("this CPU's own capability is DEFAULT: there is nothing narrower to force")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    narrow = "--paths forloop --dtypes float32 --param-sets mixed"

    def shell(command):
        return subprocess.run(command, shell=True, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    done = shell(f"optparity check --candidate optparity.optim:SGD --golden {sgd_dir} {narrow}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "running torch" in done.stdout and " DEFAULT\n" in done.stdout and "(this is not drift)" in done.stdout
    (hint,) = _hint_lines(done.stdout)
    assert f"CPU capability {native})" in hint
    record, check = re.findall(r"`([^`]+)`", hint)
    assert record.startswith("env -u ATEN_CPU_CAPABILITY optparity reference record --out ")
    assert check.startswith("env -u ATEN_CPU_CAPABILITY optparity check --candidate optparity.optim:SGD")
    done = shell(f"{record} {narrow} --no-functional -n 1")
    assert done.returncode == 0, done.stdout + done.stderr
    target = golden.machine_dir(sgd_dir)
    assert golden.read_golden(target / "SGD.txt").env["cpu_capability"] == native
    done = shell(f"{check} {narrow}")
    assert done.returncode == 0 and "same bits" in done.stdout, done.stdout + done.stderr


def test_recording_under_a_forced_capability_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(golden, "forced_capability", lambda: "AVX512")
    assert main(["reference", "record", "--out", str(tmp_path / "g"), "--algorithms", "SGD"]) == 2
    err = capsys.readouterr().err
    assert "ATEN_CPU_CAPABILITY=avx2 forces" in err and "env -u ATEN_CPU_CAPABILITY optparity reference record" in err
    assert not (tmp_path / "g").exists()


def test_forced_capability_asks_a_child_without_the_variable(monkeypatch):
    golden.forced_capability.cache_clear()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert golden.forced_capability() is None  # not set: nothing forced, no child started
    golden.forced_capability.cache_clear()
