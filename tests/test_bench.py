"""Performance tooling: the asv suite, `optparity bench`, the report and the regression check.

Everything here runs on tiny inputs: these tests prove the tools work, they measure nothing.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from optparity.bench import bandwidth
from optparity.bench.report import MEMORY_COLUMNS, SAMPLE_COLUMNS
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
    assert list(samples.columns) == [*SAMPLE_COLUMNS, "round", "run"]
    assert set(samples["round"]) == {0, 1}
    assert set(samples["benchmark"]) == {f"{a}/{i}/1M/float32" for a in ("SGD", "Adam")
                                         for i in ("optparity-foreach", "torch-foreach", "torch-fused")
                                         } | {"copy_/torch/16M/float32"}
    assert (samples["seconds"] > 0).all() and (samples["threads"] == 1).all()
    per_bench = samples.groupby("benchmark")["sample"]
    assert (per_bench.nunique() == per_bench.size()).all()  # one row per measured sample, numbered across rounds
    memory = pd.read_csv(run / "memory.csv")
    assert set(MEMORY_COLUMNS) <= set(memory.columns)
    adam_state = memory[(memory["benchmark"] == "Adam/torch-fused/1M/float32") & (memory["metric"] == "state_bytes")]
    assert adam_state["bytes"].iloc[0] == 8 * (1 << 20) + 4  # exp_avg, exp_avg_sq, one float32 step
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


def compare(capsys, base, new, *extra):
    code = main(["report", "--compare", str(base), str(new), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("base,new", [
    (FIX / "base", FIX / "base"),                         # the same data twice
    (FIX / "base", FIX / "rerun"),                        # another run within noise
    (FIX / "base" / "samples.csv", FIX / "rerun" / "samples.csv"),
    (FIX / "asv_base.json", FIX / "asv_base.json"),
    (FIX / "asv_base.json", FIX / "asv_rerun.json"),      # asv values moved by -2% / +3%
])
def test_no_regression_within_noise(capsys, base, new):
    code, out, err = compare(capsys, base, new)
    assert code == 0, out + err
    assert not [line for line in out.splitlines() if line.rstrip().endswith("SLOWER")] and "\n0 slower" in out


def test_planted_20_percent_slowdown_is_flagged(capsys):
    code, out, _ = compare(capsys, FIX / "base", FIX / "slow20")
    assert code == 1
    flagged = [line.split()[0] for line in out.splitlines() if line.rstrip().endswith("SLOWER")]
    assert flagged == [SLOWED]
    # the same slowdown is allowed by a looser threshold
    assert compare(capsys, FIX / "base", FIX / "slow20", "--threshold", "1.25")[0] == 0


def test_planted_slowdown_in_asv_results_is_flagged(capsys, tmp_path):
    code, out, _ = compare(capsys, FIX / "asv_base.json", FIX / "asv_slow20.json", "--csv", str(tmp_path / "t.csv"))
    assert code == 1
    table = pd.read_csv(tmp_path / "t.csv")
    slower = table[table["status"] == "SLOWER"]
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


def test_report_cli_exit_codes_as_ci_sees_them():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "optparity", "report", *args], capture_output=True, text=True,
                              timeout=120)

    bad = run("--compare", str(FIX / "base"), str(FIX / "bad" / "partial.csv"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "partial.csv" in bad.stderr
    slow = run("--compare", str(FIX / "base"), str(FIX / "slow20"))
    assert slow.returncode == 1 and SLOWED in slow.stdout
