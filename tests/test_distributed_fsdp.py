"""Kinds fsdp (FSDP2 fully_shard) and fsdp1 (FSDP1 use_orig_params=True): torch's element-wise
classes are shard-safe bit for bit, a norm over the local shard is caught from world size 2 and
silent on one rank, torch's fused path is compared on its own sharding, bad input exits 2 before
any rank starts. OPTPARITY_TEST_LEVEL=full re-measures the finding table of
docs/distributed-check.md ("FSDP kinds") for every torch.optim algorithm.

Ranks are shared by the whole module (one RankPool per world size)."""
from __future__ import annotations

import os

import pytest

from optparity.harness.check import UsageError
from optparity.harness.distributed.engine import Pools, check, prepare
from optparity.harness.distributed.mutants import by_name
from optparity.harness.runner import Verdict

FULL = os.environ.get("OPTPARITY_TEST_LEVEL") == "full"
LOCAL_NORM = by_name("fsdp_norm_over_local_shard")


@pytest.fixture(scope="module")
def pools():
    p = Pools("gloo", 120)
    yield p
    p.close()


@pytest.mark.parametrize("kind, ws", [("fsdp", 3), ("fsdp1", 2)])
def test_torch_adam_is_shard_safe(pools, kind, ws):
    report = check("torch.optim:Adam", kind=kind, world_sizes=[ws], level="quick", case_filter="c0\\[", pools=pools)
    assert {r.case.condition for r in report.results} == {"steps", "groups", "few_params", "lr_change"}
    assert report.ok and all(r.verdict == Verdict.BIT_IDENTICAL for r in report.results), report.first_failure.message


def test_norm_over_local_shard_caught_from_world_size_2_only(pools):
    report = check(LOCAL_NORM.candidate, kind="fsdp", world_sizes=[1, 2], algorithm=LOCAL_NORM.algorithm,
                   level="quick", case_filter="c0\\[.*steps", pools=pools)
    by_ws = {r.case.world_size: r for r in report.results}
    assert by_ws[1].verdict == Verdict.BIT_IDENTICAL, by_ws[1].message
    caught = by_ws[2]
    assert caught.verdict == Verdict.NUMERICS_DIFFER
    d = caught.divergence
    assert (d.step, d.world_size, d.where) == (1, 2, "param") and d.param and d.rank in (0, 1)


def test_fused_path_is_compared_on_the_same_sharding(pools):
    # torch's fused Adam on FSDP2 shards: bit-identical to itself on the same sharding (its distance
    # to the unsharded run is measured in the finding table, not judged here)
    report = check("torch.optim:Adam", kind="fsdp", world_sizes=[2], level="default", paths=["fused"],
                   case_filter="c0\\[.*steps", pools=pools)
    assert report.results and all(r.verdict == Verdict.BIT_IDENTICAL for r in report.results)


def test_bad_input_is_refused_before_any_rank():
    with pytest.raises(UsageError, match="wraps another optimizer"):
        prepare("torch.distributed.optim:ZeroRedundancyOptimizer", kind="fsdp", world_sizes=[2])
    with pytest.raises(UsageError, match="pass --algorithm"):
        prepare("optparity.harness.distributed.kinds.fsdp:FsdpSide", kind="fsdp1", world_sizes=[2])
    with pytest.raises(UsageError, match="fsdp1?: .*pass --kind"):  # FSDP2 or FSDP1: the user says which
        prepare("torch.optim:SGD", world_sizes=[2])


# The finding table (docs/distributed-check.md, "FSDP kinds"): torch.optim's classes on FSDP shards.
# "refused": the candidate raises; "different": silently different numbers; the rest bit-identical.
REFUSED = {"fsdp": {"Adafactor", "Rprop"}, "fsdp1": {"Muon"}}
NOT_APPLICABLE = {"SparseAdam"}  # FSDP's gradients are dense
DIFFERENT = {"fsdp": {"Muon"}, "fsdp1": {"Adafactor"}}


@pytest.mark.skipif(not FULL, reason="every algorithm under both kinds: OPTPARITY_TEST_LEVEL=full")
@pytest.mark.parametrize("kind", ["fsdp", "fsdp1"])
def test_finding_table(pools, kind):
    from optparity.harness.algorithms import ALGORITHMS, spec

    for algo in ALGORITHMS:
        if spec(algo).kind == "closure":
            continue  # LBFGS: not in the distributed matrix (the table's row is measured by hand)
        report = check(f"torch.optim:{algo}", kind=kind, world_sizes=[2, 3], level="quick", pools=pools)
        verdicts = {r.verdict for r in report.results}
        if algo in NOT_APPLICABLE:
            assert verdicts == {Verdict.NOT_APPLICABLE}, (algo, verdicts)
        elif algo in REFUSED[kind]:
            assert Verdict.ERROR_ONE_SIDE in verdicts, (algo, verdicts)
        elif algo in DIFFERENT[kind]:
            assert Verdict.NUMERICS_DIFFER in verdicts, (algo, verdicts)
        else:
            assert verdicts == {Verdict.BIT_IDENTICAL}, (algo, report.first_failure and report.first_failure.message)
