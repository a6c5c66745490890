"""The distributed check (harness/distributed/): torch's own distributed optimizers pass, planted
bugs are caught under their condition, bad input exits 2 before any rank starts.

Ranks are shared by the whole module (one RankPool per world size): cases do not pay start-up."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from optparity.harness.distributed.engine import Pools, check, prepare
from optparity.harness.runner import Verdict

FULL = os.environ.get("OPTPARITY_TEST_LEVEL") == "full"
TORCH_ZERO = "torch.distributed.optim:ZeroRedundancyOptimizer"


@pytest.fixture(scope="module")
def pools():
    p = Pools("gloo", 120)
    yield p
    p.close()


def test_torch_zero_passes_every_condition(pools):
    report = check(TORCH_ZERO, kind="zero", world_sizes=[2, 3], algorithm="Adam", level="quick",
                   case_filter="c0\\[", pools=pools)
    conditions = {r.case.condition for r in report.results}
    assert {"steps", "groups", "few_params", "lr_change", "add_param_group", "reload", "reload_down",
            "reload_up"} <= conditions
    assert report.ok, report.first_failure and report.first_failure.message
    assert all(r.verdict == Verdict.BIT_IDENTICAL for r in report.results)


def test_divided_again_is_caught_naming_rank_world_size_step_param(pools):
    report = check("optparity.harness.distributed.mutants:ZeroDividesByWorldSize", kind="zero", world_sizes=[2],
                   algorithm="Adam", level="quick", case_filter="c0\\[.*steps", pools=pools)
    first = report.first_failure
    assert first is not None and first.verdict == Verdict.NUMERICS_DIFFER
    d = first.divergence
    # Adam's first step is lr * sign(g) to a few ULPs: the state (exp_avg) shows it first
    assert (d.step, d.world_size) == (1, 2) and d.where in ("param", "state") and d.rank in (0, 1) and d.param
    assert f"rank {d.rank} of world size 2" in first.message


@pytest.mark.parametrize("argv, says", [
    (["--kind", "zero", "--world-sizes", "0"], "at least 1"),
    (["--kind", "zero", "--world-sizes", "2", "--backend", "nccl"], "NCCL"),
    (["--kind", "nonsense", "--world-sizes", "2"], "unknown --kind"),
])
def test_bad_input_exits_2_before_any_rank(argv, says):
    if "nccl" in argv:
        import torch
        if torch.cuda.device_count() >= 2:
            pytest.skip("this machine has the GPUs NCCL needs")
    out = subprocess.run([sys.executable, "-m", "optparity", "check", "--candidate", TORCH_ZERO, *argv],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr


def test_not_a_wrapper_is_refused():
    from optparity.harness.check import UsageError

    with pytest.raises(UsageError, match="not a ZeRO-style wrapper"):
        prepare("torch.optim:Adam", kind="zero", world_sizes=[2])
