"""Performance tooling: the asv suite, `optparity bench`, the report and the regression check.

Everything here runs on tiny inputs: these tests prove the tools work, they measure nothing.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from optparity.bench import bandwidth
from optparity.bench import blocks
from optparity.bench.report import BLOCK_COLUMNS, MEMORY_COLUMNS, SAMPLE_COLUMNS
from optparity.bench.workloads import ALGORITHMS, WORKLOADS
from optparity.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "bench"
SLOWED = "Adam/optparity-foreach/1M/float32"  # planted 20% slowdown in fixtures/bench/slow20


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(ROOT / "suites"))
    try:
        from benchmarks import bench_distributed, bench_step
        yield bench_step, bench_distributed
    finally:
        sys.path.remove(str(ROOT / "suites"))


# ---------------------------------------------------------------- the asv suite

def test_step_benchmarks_run_one_iteration(suite):
    bench_step, _ = suite
    args = ("SGD", "optparity-foreach", "1M", "float32")
    timed = bench_step.StepTime()
    timed.setup(*args, 1)
    timed.time_step(*args, 1)
    assert torch.get_num_threads() == 1
    mem = bench_step.StepMemory()
    mem.setup("Adam", "torch-fused", "1M", "bfloat16")
    assert mem.track_state_bytes("Adam", "torch-fused", "1M", "bfloat16") == 2 * 2 * (1 << 20) + 4  # exp_avg, exp_avg_sq in bf16; one fp32 step
    mem.peakmem_step("Adam", "torch-fused", "1M", "bfloat16")
    threads = bench_step.Threads()
    threads.setup(1)
    assert threads.track_num_threads(1) == 1
    ratio = bench_step.StepRatio()
    ratio.blocks = 4  # the figure's mechanics, not a measurement
    ratio.setup("SGD", "foreach", "1M", "float32")
    assert 0 < ratio.track_ratio_to_torch("SGD", "foreach", "1M", "float32") < 100


def test_impossible_and_gpu_only_combinations_skip_the_asv_way(suite):
    bench_step, _ = suite
    with pytest.raises(NotImplementedError, match="no fused Rprop"):
        bench_step.StepTime().setup("Rprop", "torch-fused", "1M", "float32", 1)
    with pytest.raises(NotImplementedError, match="no fused Rprop"):
        bench_step.StepMemory().setup("Rprop", "torch-fused", "1M", "float32")
    if not torch.cuda.is_available():
        with pytest.raises(NotImplementedError, match="CUDA"):
            bench_step.CudaStep().setup("Adam", "torch-foreach", "1M", "float32")


def test_distributed_benchmarks_run_one_iteration(suite):
    _, bench_distributed = suite
    try:
        for impl in ("torch", "optparity"):
            zero = bench_distributed.ZeroStep()
            try:
                zero.setup(impl, 1)
            except NotImplementedError as e:  # optparity's ZeRO may not have landed yet
                assert impl == "optparity" and "ZeroRedundancyOptimizer" in str(e)
                continue
            zero.time_step(impl, 1)
            zero.time_roundtrip(impl, 1)
            # world size 1: the one rank holds Adam's whole state, 8 bytes per element plus step counters
            assert zero.track_state_bytes_per_rank(impl, 1) >= 8 * WORKLOADS["transformer"].numel
        for mode in ("local", "post_local_sgd"):
            pls = bench_distributed.PostLocalSGD()
            pls.setup("optparity", mode, 1)  # world size 1 reuses the pool started above
            pls.time_period("optparity", mode, 1)
    finally:
        bench_distributed._close_pools()


def test_asv_check_accepts_the_suite():
    asv = shutil.which("asv", path=os.path.dirname(sys.executable)) or shutil.which("asv")
    if asv is None:
        pytest.skip("asv is not installed")
    out = subprocess.run([asv, "check", "--python=same"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "No problems found" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------- optparity bench

def test_traffic_model_covers_every_algorithm():
    assert set(bandwidth.TRAFFIC) == set(ALGORITHMS)
    assert bandwidth.bytes_per_element("Adam", torch.float32) == 28
    assert bandwidth.bytes_per_element("Adam", torch.bfloat16) == 14
    assert bandwidth.bytes_per_element("SGD", torch.float32) == 12


def test_bench_smoke_run_writes_the_report(tmp_path, capsys):
    code = main(["bench", "--algorithms", "SGD,Adam", "--impls", "optparity-foreach,torch-foreach,torch-fused",
                 "--workloads", "1M", "--dtypes", "float32", "--quick", "--rounds", "2", "--out", str(tmp_path),
                 "--run-name", "smoke", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    run = tmp_path / "smoke"
    samples = pd.read_csv(run / "samples.csv")
    assert list(samples.columns) == [*SAMPLE_COLUMNS, *BLOCK_COLUMNS, "run"]
    assert set(samples["round"]) == {0, 1} and set(samples["pass"]) == {0}
    assert set(samples["benchmark"]) == {f"{a}/{i}/1M/float32" for a in ("SGD", "Adam")
                                         for i in ("optparity-foreach", "torch-foreach", "torch-fused")
                                         } | {"copy_/torch/4M/float32"}
    assert (samples["seconds"] > 0).all() and (samples["cpu_seconds"] >= 0).all() and (samples["threads"] == 1).all()
    per_bench = samples.groupby("benchmark")["sample"]
    assert (per_bench.nunique() == per_bench.size()).all()  # one row per measured sample, numbered across rounds
    # interleaved: every step block of a group has that block's copy_ reference, and each group's
    # implementations share their block numbers (the pairs optparity/torch is computed from)
    steps = samples[samples["algorithm"] != "copy_"]
    assert (steps["copy_seconds"] > 0).all()
    per_block = steps.groupby(["group", "round", "block"])["impl"].nunique()
    assert (per_block == 3).all() and len(per_block) == 2 * 2 * 4  # 2 groups x 2 rounds x QUICK's 4 blocks
    memory = pd.read_csv(run / "memory.csv")
    assert set(MEMORY_COLUMNS) <= set(memory.columns)
    adam_state = memory[(memory["benchmark"] == "Adam/torch-fused/1M/float32") & (memory["metric"] == "state_bytes")]
    assert adam_state["bytes"].iloc[0] == 8 * (1 << 20) + 4  # exp_avg, exp_avg_sq, one float32 step
    adam_peak = memory[(memory["benchmark"] == "Adam/optparity-foreach/1M/float32")
                       & (memory["metric"].isin(["step_peak_bytes", "step_alloc_bytes"]))]
    assert len(adam_peak) == 4 and (adam_peak["bytes"] >= 0).all()
    meta = json.loads((run / "run.json").read_text())
    assert meta["threads (torch.set_num_threads)"] == 1 and meta["allocator"] and meta["torch"] == torch.__version__
    md = (run / "summary.md").read_text()
    assert "Bytes moved per element per step" in md and "| Adam " in md and "28" in md
    html = (run / "index.html").read_text()
    pngs = sorted(p.name for p in run.glob("*.png"))
    assert pngs == ["latency_float32.png", "memory.png", "ratio.png", "roofline.png"]
    for name in pngs:
        assert f"src='{name}'" in html
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # headline first, then the ratio and latency plots, then the tables; a quick run claims nothing
    assert html.index("class='headline") < html.index("src='ratio.png'") < html.index("src='latency_float32.png'")
    assert html.index("src='latency_float32.png'") < html.index("<table")
    assert "Quick run, indicative only" in html and "beyond noise" not in html + md
    assert "yes (p=" not in html


def test_block_timer_records_both_clocks_and_calibrates():
    calls = []
    timer = blocks.block_timer(lambda: calls.append(1))
    wall, cpu = timer(5)
    assert len(calls) == 5 and wall >= 0 and cpu >= 0
    assert 1 <= blocks.calibrate(timer, 0.001) <= blocks.MAX_NUMBER
    rows = blocks.interleaved({"a": timer, "b": timer}, timer, blocks=3, block_seconds=1e-4)
    assert [(r["key"], r["block"]) for r in rows] == [(k, b) for b in range(3) for k in ("a", "b")]
    assert all(r["copy_seconds"] >= 0 and r["number_per_run"] >= 1 for r in rows)


def test_a_block_is_the_median_of_its_calls_whatever_their_count():
    # a cold first call (here: 20 ms of busy work) must not leak into the figure through the
    # count of calls per block, which calibration picks from a noisy single call
    def cold_then_warm():
        calls.append(1)
        if len(calls) == 1:
            end = time.process_time() + 0.02
            while time.process_time() < end:
                pass

    for number in (3, 5, 40):
        calls = []
        wall, cpu = blocks.block_timer(cold_then_warm)(number)
        assert len(calls) == number and cpu < 0.002 and wall < 0.02


def test_a_block_holds_at_least_min_calls_up_to_the_longest_block():
    def fixed(cpu):
        return lambda n: (cpu, cpu)

    assert blocks.calibrate(fixed(0.004), 0.02) == 5                       # 20 ms of a 4 ms step
    assert blocks.calibrate(fixed(0.004), 0.02, min_calls=10) == 10        # the floor of calls
    assert blocks.calibrate(fixed(0.001), 0.02, min_calls=10) == 20        # short steps: the duration rules
    long = blocks.calibrate(fixed(0.05), 0.02, min_calls=10)               # 50 ms steps: capped block
    assert long == round(blocks.MAX_BLOCK_SECONDS / 0.05) < 10


def test_a_group_is_measured_over_fresh_tensor_layouts(monkeypatch):
    from optparity.bench import measure

    made = []
    real = measure.prepared

    def recording(*args, **kwargs):
        opt = real(*args, **kwargs)
        made.append((args[1], opt.param_groups[0]["params"][0].data_ptr()))
        return opt

    monkeypatch.setattr(measure, "prepared", recording)
    budget = measure.Budget(blocks=10, block_seconds=1e-4, memory_samples=1, min_calls=1, layouts=4)
    cases = [measure.Case("SGD", i, "1M", "float32") for i in ("optparity-foreach", "torch-foreach")]
    timing, memory = measure.measure_group(cases, threads=1, budget=budget)
    # four segments, each with its own optimizers, allocated while the previous ones were alive
    for impl in ("optparity-foreach", "torch-foreach"):
        ptrs = [p for i, p in made if i == impl]
        # only the previous segment is alive at allocation: segment 3 may reuse segment 1's memory
        assert len(ptrs) == 4 and all(a != b for a, b in zip(ptrs, ptrs[1:])), ptrs
    # the blocks are numbered straight through the segments (10 = 3 + 3 + 2 + 2), once per case
    for c in cases:
        assert sorted(r["block"] for r in timing if r["benchmark"] == c.benchmark) == list(range(10))
    assert memory  # memory still recorded, once


def test_cpu_blocks_alternate_single_calls_of_the_paths():
    calls = []

    def timer(key, cost):
        def run(number):
            return cost, cost

        run.once = lambda: calls.append(key) or (cost, cost)
        return run

    rows = blocks.interleaved({"a": timer("a", 1e-3), "b": timer("b", 2e-3)}, lambda n: (0.0, 0.0), blocks=2,
                              block_seconds=4e-3)
    # calibration: a 4 calls, b 2: every path gets the median count, 3, in alternating sweeps
    assert all(r["number_per_run"] == 3 for r in rows)
    assert calls == ["a", "b", "b", "a", "a", "b"] + ["b", "a", "a", "b", "b", "a"]
    assert {(r["key"], r["cpu_seconds"]) for r in rows} == {("a", 1e-3), ("b", 2e-3)}


def test_segments_keep_the_rotation_of_one_long_run():
    keys = "abcd"
    order, split = [], []
    fake = {k: (lambda n, k=k: order.append(k) or (0.0, 0.0)) for k in keys}
    blocks.interleaved(fake, lambda n: (0.0, 0.0), blocks=16, block_seconds=1e-4)
    whole, order[:] = order[2 * len(keys):], []
    for first in (0, 5, 11):
        blocks.interleaved(fake, lambda n: (0.0, 0.0), blocks={0: 5, 5: 6, 11: 5}[first], block_seconds=1e-4,
                           first_block=first)
        split += order[2 * len(keys):]
        order[:] = []
    assert split == whole


def test_interleaving_puts_every_benchmark_in_every_position_equally_often():
    for keys in ("ab", "abc", "abcd"):
        order = []
        fake = {k: (lambda n, k=k: order.append(k) or (0.0, 0.0)) for k in keys}
        blocks.interleaved(fake, lambda n: (0.0, 0.0), blocks=4 * len(keys), block_seconds=1e-4)
        order = order[2 * len(keys):]  # calibrate() called every timer twice first
        first = [order[i] for i in range(0, len(order), len(keys))]
        last = [order[i + len(keys) - 1] for i in range(0, len(order), len(keys))]
        assert all(first.count(k) == first.count(keys[0]) for k in keys), (keys, first)
        assert all(last.count(k) == last.count(keys[0]) for k in keys), (keys, last)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device: CUDA events and torch.cuda.max_memory_allocated")
def test_cuda_blocks_use_events_and_the_allocator_peak():
    from optparity.bench import measure

    x = torch.zeros(1 << 20, device="cuda")
    wall, cpu = blocks.block_timer(lambda: x.add_(1), "cuda")(3)
    assert wall == cpu > 0  # event time stands for both clocks on a GPU
    peak, allocated = measure.step_memory(lambda: (x * 2).sum(), "cuda")
    assert peak >= x.numel() * 4 and allocated >= x.numel() * 4


def test_bench_usage_errors_exit_2(tmp_path, capsys):
    assert main(["bench", "--algorithms", "Rprop", "--impls", "torch-fused", "--out", str(tmp_path)]) == 2
    assert "nothing to measure" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "samples.csv").write_text("x\n")
    assert main(["bench", "--algorithms", "SGD", "--out", str(tmp_path), "--run-name", "taken"]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--algorithms", "Adamm"])
    assert e.value.code == 2 and "Adamm" in capsys.readouterr().err


# ---------------------------------------------------------------- optparity report

def test_report_rebuilds_from_fixture_samples(tmp_path, capsys):
    run = tmp_path / "base"
    shutil.copytree(FIX / "base", run)
    assert main(["report", str(run)]) == 0
    for name in ("summary.md", "index.html", "latency_float32.png", "ratio.png", "roofline.png", "memory.png"):
        assert (run / name).stat().st_size > 0, name
    md = (run / "summary.md").read_text()
    assert "optparity / torch, every case" in md and "Adam" in md and "IQR" in md


def test_report_on_a_partial_run_exits_2_naming_the_file(tmp_path, capsys):
    run = tmp_path / "broken"
    run.mkdir()
    shutil.copy(FIX / "bad" / "partial.csv", run / "samples.csv")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "samples.csv" in err and "'seconds'" in err and "Traceback" not in err


def compare(capsys, base, new, *extra, html=None):
    # the HTML page goes to a temporary file, not into the fixture directories
    page = html or Path(tempfile.gettempdir()) / f"optparity-compare-{os.getpid()}.html"
    code = main(["report", "--compare", str(base), str(new), "--html", str(page), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("base,new", [
    (FIX / "base", FIX / "base"),                         # the same data twice
    (FIX / "base", FIX / "rerun"),                        # another run within noise
    (FIX / "base", FIX / "slowmachine"),                  # the whole machine 12.5% slower: normalised away
    (FIX / "base" / "samples.csv", FIX / "rerun" / "samples.csv"),
    (FIX / "asv_base.json", FIX / "asv_base.json"),
    (FIX / "asv_base.json", FIX / "asv_rerun.json"),      # asv values moved by -2% / +3%
])
def test_no_regression_within_noise(capsys, base, new):
    code, out, err = compare(capsys, base, new)
    assert code == 0, out + err
    assert not [line for line in out.splitlines() if line.rstrip().endswith("REGRESSION")]
    assert "No regression" in out.splitlines()[-1] or "No regression" in out


def flagged(out: str) -> list[str]:
    return [line.split()[0] + (" " + line.split()[1] if line.split()[1].startswith("[") else "")
            for line in out.splitlines() if line.rstrip().endswith("REGRESSION")]


def test_a_slower_machine_is_a_regression_only_in_raw_seconds(capsys):
    code, out, _ = compare(capsys, FIX / "base", FIX / "slowmachine", "--raw")
    assert code == 1 and len(flagged(out)) == 4  # every optparity step slower on the clock (torch's: references)


@pytest.mark.parametrize("run,factor", [("slow20", 1.2), ("slow05", 1.05)])
def test_planted_slowdown_is_flagged_only_there(capsys, tmp_path, run, factor):
    code, out, _ = compare(capsys, FIX / "base", FIX / run, "--csv", str(tmp_path / "t.csv"))
    assert code == 1
    assert flagged(out) == [SLOWED]
    table = pd.read_csv(tmp_path / "t.csv", index_col=0)
    assert abs(table.loc[SLOWED, "ratio"] - factor) < 0.02
    headline = out.strip().splitlines()[-3]
    assert headline.startswith("REGRESSION in 1 of") and SLOWED in headline and "95% CI" in headline
    # a larger minimum effect lets the same slowdown pass
    assert compare(capsys, FIX / "base", FIX / run, "--min-effect", str(factor - 1 + 0.05))[0] == 0


def test_a_stored_remeasurement_decides(capsys, tmp_path):
    """slow05 holds a re-measured pass of its suspect (as bench --baseline writes it): the verdict
    needs both passes; without the re-measurement the first pass decides alone."""
    code, out, _ = compare(capsys, FIX / "base", FIX / "slow05")
    assert code == 1 and "re-measured: 1.0" in out
    first = tmp_path / "first"
    first.mkdir()
    samples = pd.read_csv(FIX / "slow05" / "samples.csv")
    samples[samples["pass"] == 0].to_csv(first / "samples.csv", index=False)
    code, out, _ = compare(capsys, FIX / "base", first)
    assert "re-measured:" not in out
    # a suspect whose re-measurement is back to normal is not called
    normal = tmp_path / "normal"
    normal.mkdir()
    again = pd.read_csv(FIX / "rerun" / "samples.csv").assign(**{"pass": 1})
    pd.concat([samples[samples["pass"] == 0], again[again["algorithm"] == "Adam"]]).to_csv(normal / "samples.csv",
                                                                                         index=False)
    code, out, _ = compare(capsys, FIX / "base", normal)
    assert code == 0 and "not confirmed on re-measurement" in out


def test_planted_memory_regression_is_caught_exactly(capsys, tmp_path):
    code, out, _ = compare(capsys, FIX / "base", FIX / "mem", "--csv", str(tmp_path / "t.csv"))
    assert code == 1
    table = pd.read_csv(tmp_path / "t.csv", index_col=0)
    bad = table[table["verdict"] == "REGRESSION"]
    assert sorted(bad.index) == [f"{SLOWED} [step_alloc_bytes]", f"{SLOWED} [step_peak_bytes]"]
    assert (bad["delta_bytes"] == 4 * (1 << 20)).all()
    assert "+4.00 MiB" in out


def test_compare_writes_the_headline_and_an_html_diff_page(capsys, tmp_path):
    page = tmp_path / "diff.html"
    code, out, _ = compare(capsys, FIX / "base", FIX / "slow20", html=page)
    assert code == 1
    text = page.read_text()
    assert text.index("class='headline bad'") < text.index("<img") < text.index("<table")
    assert "REGRESSION in 1 of" in text and (tmp_path / "diff.png").read_bytes()[:4] == b"\x89PNG"
    compare(capsys, FIX / "base", FIX / "rerun", html=page)
    assert "class='headline'>No regression" in page.read_text()


def test_remeasure_appends_a_fresh_pass_and_decides_on_it(capsys, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(FIX / "slow20", new)
    meta = json.loads((new / "run.json").read_text())
    (new / "run.json").write_text(json.dumps({**meta, "budget": "quick: for the test"}))
    code, out, err = compare(capsys, FIX / "base", new, "--remeasure")
    assert code in (0, 1), err  # the verdict depends on this machine's real Adam; the mechanics do not
    samples = pd.read_csv(new / "samples.csv")
    again = samples[samples["pass"] == 1]
    assert set(again["benchmark"]) == {SLOWED, "Adam/torch-foreach/1M/float32", "copy_/torch/4M/float32"}
    assert "re-measuring 1 suspect(s)" in out


def test_remeasure_refuses_a_run_of_another_commit(capsys, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(FIX / "slow20", new)
    meta = json.loads((new / "run.json").read_text())
    (new / "run.json").write_text(json.dumps({**meta, "git sha": "0000000"}))
    code, _, err = compare(capsys, FIX / "base", new, "--remeasure")
    from optparity.bench.cli import _git_sha
    if _git_sha() == "nogit":
        pytest.skip("this optparity is not in a git checkout: no commit to check against")
    assert code == 2 and "0000000" in err and "re-measure on NEW's commit" in err


def test_planted_slowdown_in_asv_results_is_flagged(capsys, tmp_path):
    code, out, _ = compare(capsys, FIX / "asv_base.json", FIX / "asv_slow20.json", "--csv", str(tmp_path / "t.csv"))
    assert code == 1
    table = pd.read_csv(tmp_path / "t.csv")
    slower = table[table["verdict"] == "REGRESSION"]
    assert len(slower) > 0 and slower["benchmark"].str.contains("StepTime.time_step").all()
    assert (slower["ratio"].round(3) == 1.2).all()


@pytest.mark.parametrize("new,expected", [
    (FIX / "bad" / "missing_column.csv", ["missing_column.csv", "seconds"]),
    (FIX / "bad" / "partial.csv", ["partial.csv", "'seconds'", "row 8"]),
    (FIX / "bad" / "ragged.csv", ["ragged.csv", "not a readable CSV"]),
    (FIX / "bad" / "header_only.csv", ["header_only.csv", "no samples"]),
    (FIX / "bad" / "empty.csv", ["empty.csv", "empty"]),
    (FIX / "asv_malformed.json", ["asv_malformed.json", "JSON"]),
    (FIX / "asv_no_columns.json", ["asv_no_columns.json", "result_columns"]),
    (FIX / "does-not-exist", ["does-not-exist", "no such file"]),
    (FIX, ["no samples.csv"]),
])
def test_unusable_results_exit_2_with_a_clear_message(capsys, new, expected):
    code, _, err = compare(capsys, FIX / "base", new)
    assert code == 2
    assert "Traceback" not in err and err.startswith("optparity report: ")
    for text in expected:
        assert text in err, err


def test_partial_asv_results_exit_2_unless_allowed(capsys):
    code, _, err = compare(capsys, FIX / "asv_base.json", FIX / "asv_partial.json")
    assert code == 2 and "partial results" in err and "asv_partial.json" in err and "--allow-missing" in err
    assert compare(capsys, FIX / "asv_base.json", FIX / "asv_partial.json", "--allow-missing")[0] == 0


def test_nothing_in_common_and_bad_threshold_exit_2(capsys):
    code, _, err = compare(capsys, FIX / "base", FIX / "asv_base.json")
    assert code == 2 and "no benchmark in common" in err
    code, _, err = compare(capsys, FIX / "base", FIX / "rerun", "--threshold", "0.9")
    assert code == 2 and "--threshold" in err


def test_report_cli_exit_codes_as_ci_sees_them(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "optparity", "report", *args], capture_output=True, text=True,
                              timeout=120)

    bad = run("--compare", str(FIX / "base"), str(FIX / "bad" / "partial.csv"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "partial.csv" in bad.stderr
    slow = run("--compare", str(FIX / "base"), str(FIX / "slow20"), "--html", str(tmp_path / "a.html"))
    assert slow.returncode == 1 and SLOWED in slow.stdout


# ---------------------------------------------------------------- instruction counts

def test_callgrind_totals_are_parsed_and_garbage_refused():
    from optparity.bench import instructions

    assert instructions.parse_callgrind_total("version: 1\ncmd: python\nevents: Ir\nsummary: 123456\n") == 123456
    assert instructions.parse_callgrind_total("events: Ir\nfn=main\n1 5\ntotals: 99\n") == 99
    with pytest.raises(ValueError, match="callgrind"):
        instructions.parse_callgrind_total("not a profile")


def test_instruction_counts_compare_with_the_minimum_effect(capsys, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(FIX / "rerun", new)
    base = tmp_path / "base"
    shutil.copytree(FIX / "base", base)
    for run, count in ((base, 1_000_000), (new, 1_020_000)):  # +2%: within the 3% tolerance
        mem = pd.read_csv(run / "memory.csv")
        row = mem.iloc[:1].assign(metric="instructions_per_step", bytes=count, benchmark=SLOWED)
        pd.concat([mem, row]).to_csv(run / "memory.csv", index=False)
    assert compare(capsys, base, new)[0] == 0
    mem = pd.read_csv(new / "memory.csv")
    mem.loc[mem["metric"] == "instructions_per_step", "bytes"] = 1_100_000  # +10%
    mem.to_csv(new / "memory.csv", index=False)
    code, out, _ = compare(capsys, base, new)
    assert code == 1 and flagged(out) == [f"{SLOWED} [instructions_per_step]"]
