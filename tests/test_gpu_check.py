"""scripts/gpu-check.sh, as far as a machine without a GPU can run it: the preflight on the CPU
(versions, what is importable, the GPU), then a clear skip before the first CUDA step (exit 3).
On a GPU machine the script itself is the test (docs/support.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optparity.harness import levels

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu-check.sh"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is here: run scripts/gpu-check.sh itself (its steps take minutes)")


def _run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), "--no-install", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)


def test_without_a_gpu_the_preflight_runs_and_the_cuda_steps_are_skipped_clearly(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "SKIPPED: no CUDA device here (torch.cuda.is_available() is False)" in done.stdout
    out = tmp_path / "out"
    env = json.loads((out / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["cuda_available"] is False
    assert env["compared_against"].startswith(f"torch {torch.__version__} (installed)")
    assert env["modules"]["pandas"] and env["modules"]["torch"] == torch.__version__
    summary = (out / "summary.txt").read_text()
    assert "SKIPPED: no CUDA device" in summary and "cpu_capability: " in summary
    assert not list(out.glob("1-*.log")), "a CUDA step ran without a GPU"


def test_unknown_option_is_a_usage_error(tmp_path):
    done = _run(tmp_path, "--fast")
    assert done.returncode == 2 and "unknown option --fast" in done.stderr


@pytest.mark.skipif(levels.suite_level() == "quick", reason="collects the suites (slow on 2 cores); "
                                                           "OPTPARITY_TEST_LEVEL=default runs it")
def test_dry_run_lists_the_cuda_tests_and_the_nccl_suites_at_world_size_1(tmp_path):
    done = _run(tmp_path, "--dry-run")
    assert done.returncode == 3, done.stdout + done.stderr
    cuda = (tmp_path / "out" / "collected-cuda.txt").read_text()
    nccl = (tmp_path / "out" / "collected-nccl.txt").read_text()
    assert "tests/test_device.py::test_cli_quick_adam_on_cuda_exits_0_with_fused_and_capturable_cases" in cuda
    ids = [line for line in nccl.splitlines() if "::" in line]
    assert ids and all("nccl" in i for i in ids)
    assert "suites/distributed/test_zero.py::test_training_parity_all_algorithms[1-nccl]" in ids
    assert not [i for i in ids if "[2-nccl]" in i or "-2-" in i or "[3" in i], ids
