"""Instruction counts per step (optparity.bench.instructions) and their verdict: a deterministic
figure, a rise beyond the minimum effect is a regression outright. Cheap tests on synthetic counts
and callgrind texts; the real callgrind run (about a minute: valgrind loads torch) only with
OPTPARITY_TEST_LEVEL=full and valgrind installed."""
from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path

import pandas as pd
import pytest

from optparity.bench import compare as compare_mod
from optparity.bench import decide, instructions
from optparity.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "bench"
SLOWED = "Adam/optparity-foreach/1M/float32"
BASE_COUNT = 1_000_000


def test_callgrind_dump_trigger_and_total_are_parsed():
    dump = ("# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 7\ncmd:  python -m x\npart: 3\n\n"
            "desc: I1 cache: \ndesc: Timerange: Basic block 10 - 20\n"
            "desc: Trigger: Client Request: Adam/optparity-foreach/1M/float32 steps=6\n\n"
            "positions: line\nevents: Ir\nsummary: 4242\n\nfn=(1) main\n0 4242\n\ntotals: 4242\n")
    assert instructions.parse_trigger(dump) == "Adam/optparity-foreach/1M/float32 steps=6"
    assert instructions.parse_callgrind_total(dump) == 4242
    assert instructions.parse_trigger(dump.replace("Client Request", "Program termination")) is None


def test_count_per_step_is_the_difference_of_the_two_windows():
    low, high = instructions.STEPS
    dumps = {f"{SLOWED} steps={low}": 500 + low * 1_000, f"{SLOWED} steps={high}": 500 + high * 1_000}
    assert instructions.per_step(dumps, SLOWED) == 1_000  # the 500 around the steps cancels
    with pytest.raises(instructions.Unavailable, match="SGD/optparity-foreach"):
        instructions.per_step(dumps, "SGD/optparity-foreach/1M/float32")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="client requests encoded for x86-64")
def test_client_request_code_is_a_no_op_natively():
    """Outside valgrind the marker sequence does nothing: the request returns its default."""
    request = instructions.ClientRequests()
    assert request(instructions.RUNNING_ON_VALGRIND) == 0
    assert request(instructions.RUNNING_ON_VALGRIND, default=7) == 7
    assert request(instructions.ZERO_STATS, 123, default=5) == 5


def test_request_codes_match_callgrind_h():
    header = Path("/usr/include/valgrind/callgrind.h")
    if not header.exists():
        pytest.skip("valgrind headers not installed (/usr/include/valgrind/callgrind.h)")
    order = [line.strip().split()[0].rstrip(",") for line in header.read_text().splitlines()
             if line.strip().startswith("VG_USERREQ__")]
    base = instructions.DUMP_STATS_AT - 3
    assert order[:6] == ["VG_USERREQ__DUMP_STATS", "VG_USERREQ__ZERO_STATS", "VG_USERREQ__TOGGLE_COLLECT",
                         "VG_USERREQ__DUMP_STATS_AT", "VG_USERREQ__START_INSTRUMENTATION",
                         "VG_USERREQ__STOP_INSTRUMENTATION"]
    assert base == 0x43540000  # VG_USERREQ_TOOL_BASE('C','T')
    assert (instructions.ZERO_STATS, instructions.START_INSTRUMENTATION, instructions.STOP_INSTRUMENTATION) == (
        base + 1, base + 4, base + 5)


@pytest.mark.parametrize("new,verdict", [
    (BASE_COUNT, decide.SAME),                      # equal: no change
    (BASE_COUNT * 103 // 100 - 1, decide.SAME),     # 3% - 1: within the minimum effect
    (BASE_COUNT * 103 // 100, decide.SAME),         # exactly 3%: not beyond it
    (BASE_COUNT * 103 // 100 + 1, decide.REGRESSION),  # 3% + 1: caught, no test needed
    (BASE_COUNT * 100 // 103 - 1, decide.FASTER),
])
def test_count_verdict_is_exact_beyond_the_minimum_effect(new, verdict):
    assert decide.count_verdict(BASE_COUNT, new, decide.MIN_EFFECT) == verdict


def _with_counts(tmp_path, counts: dict[str, tuple[int, int]]) -> tuple[Path, Path]:
    """Copies of the fixture runs base and rerun (timings within noise) with instruction counts."""
    base, new = tmp_path / "base", tmp_path / "new"
    shutil.copytree(FIX / "base", base)
    shutil.copytree(FIX / "rerun", new)
    for run, side in ((base, 0), (new, 1)):
        mem = pd.read_csv(run / "memory.csv")
        rows = [mem.iloc[:1].assign(metric=instructions.METRIC, bytes=c[side], benchmark=b) for b, c in counts.items()]
        pd.concat([mem, *rows]).to_csv(run / "memory.csv", index=False)
    return base, new


def _compare(capsys, base, new, page):
    code = main(["report", "--compare", str(base), str(new), "--html", str(page)])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("new,regressed", [(BASE_COUNT * 103 // 100 - 1, False), (BASE_COUNT * 103 // 100 + 1, True)])
def test_compare_calls_a_count_beyond_the_minimum_effect_and_says_so(capsys, tmp_path, new, regressed):
    other = "SGD/optparity-foreach/1M/float32"
    base, new_run = _with_counts(tmp_path, {SLOWED: (BASE_COUNT, new), other: (2_000_000, 2_000_000)})
    code, out = _compare(capsys, base, new_run, tmp_path / "c.html")
    flagged = [line.split()[0] for line in out.splitlines() if line.rstrip().endswith("REGRESSION")]
    page = (tmp_path / "c.html").read_text()
    assert "Instructions per step (callgrind" in page and "instructions per step (callgrind, deterministic)" in out
    counts_line = next(line for line in out.splitlines() if "instructions:" in line)
    headline = next(line for line in out.splitlines() if line.startswith(("REGRESSION in", "No regression")))
    if regressed:
        assert code == 1 and flagged == [SLOWED]
        assert "instructions: 1 REGRESSION, 1 no change" in counts_line
        assert headline.startswith("REGRESSION") and "1.030x instructions per step (1,000,000 -> 1,030,001" in headline
    else:
        assert code == 0 and flagged == []
        assert "instructions: 2 no change" in counts_line
        assert "2 instruction counts per step, none more than 3% higher" in headline


def _tracker_proof():
    spec = importlib.util.spec_from_file_location("tracker_proof", ROOT / "scripts" / "tracker_proof.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tracker_proof_expects_the_target_count_in_both_slowdowns_only():
    tp = _tracker_proof()
    assert tp.expected("slow5+mem", tp.TARGET_INSTRUCTIONS, "instructions")
    assert tp.expected("slow20", tp.TARGET_INSTRUCTIONS, "instructions")
    assert not tp.expected("aa", tp.TARGET_INSTRUCTIONS, "instructions")
    assert not tp.expected("slow5+mem", "Adam/optparity-forloop/1M/float32 [instructions_per_step]", "instructions")
    assert not tp.expected("slow20", tp.MEMORY_TARGETS[0], "memory")


def test_tracker_proof_summary_counts_catches_and_false_alarms_per_kind():
    tp = _tracker_proof()
    other = "SGD/optparity-foreach/1M/float32 [instructions_per_step]"
    rows, runs = [], []
    for rep in range(2):
        runs.append({"rep": rep, "scenario": "base", "exit": 0, "seconds": 60.0, "load_before": 1.0, "load_after": 2.0})
        for scenario in tp.SCENARIOS:
            runs.append({"rep": rep, "scenario": scenario, "exit": 0, "seconds": 80.0, "load_before": 1.5,
                         "load_after": 3.5})
            planted = scenario.startswith("slow")
            figures = [(tp.TARGET, "time", "REGRESSION" if planted and rep == 0 else "no change", 1.06),
                       (tp.TARGET_INSTRUCTIONS, "instructions", "REGRESSION" if planted else "no change",
                        1.05 if planted else 1.0),
                       # one false alarm by instructions: the SGD count in rep 1 of aa
                       (other, "instructions", "REGRESSION" if (scenario, rep) == ("aa", 1) else "no change",
                        1.2 if (scenario, rep) == ("aa", 1) else 1.0)]
            figures += [(m, "memory", "REGRESSION" if scenario == "slow5+mem" else "no change", 1.1)
                        for m in tp.MEMORY_TARGETS]
            for figure, kind, verdict, ratio in figures:
                rows.append({"rep": rep, "scenario": scenario, "figure": figure, "kind": kind, "final": verdict,
                             "first_pass": verdict, "raw_wall": verdict, "ratio": ratio,
                             "delta_bytes": 4_194_304 if kind == "memory" else None,
                             "expected": tp.expected(scenario, figure, kind)})
    text = tp.summarize(pd.DataFrame(rows), pd.DataFrame(runs), 1000, 4000, 1 << 20, 600.0, 2)
    assert "| false alarms by instructions |" in text and "| caught by instructions |" in text
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| scenario | runs"))
    rows = lines[first + 2:first + 2 + len(tp.SCENARIOS)]  # the scenario table, not the verdict counts below
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in rows}
    header = [c.strip() for c in lines[first].split("|")[1:-1]]
    col = {name: header.index(name) for name in header}
    assert table["aa"][col["false alarms by instructions"]] == "1"
    assert table["aa-load"][col["false alarms by instructions"]] == "0"
    assert table["slow5+mem"][col["caught by instructions"]] == "2 / 2"
    assert table["slow20"][col["caught by timing"]] == "1 / 2"
    assert table["slow5+mem"][col["caught by memory"]].startswith("4 / 4")
    assert table["aa"][col["caught by instructions"]] == "-"
    assert "Instruction-count figures compared with nothing planted in them: 12; false alarms (final rule): 1." in text
    assert "Unplanted instruction counts identical to BASE's: 11 of 12" in text


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not installed")
@pytest.mark.skipif(os.environ.get("OPTPARITY_TEST_LEVEL") != "full",
                    reason="a real callgrind run loads torch under valgrind (about a minute): OPTPARITY_TEST_LEVEL=full")
def test_a_real_count_is_deterministic_and_sees_an_extra_pass():
    from optparity.bench.measure import Case

    cases = [Case("SGD", "optparity-foreach", "1M", "float32"), Case("Adam", "optparity-foreach", "1M", "float32")]
    first, again = instructions.count(cases), instructions.count(cases[:1])
    sgd, adam = first[cases[0].benchmark], first[cases[1].benchmark]
    assert sgd > 1 << 17  # at least a few instructions per element: the count covers the kernels
    assert adam > 2 * sgd  # Adam's step makes several passes where SGD's makes one
    assert abs(again[cases[0].benchmark] - sgd) <= 1e-4 * sgd, (again, first)
