"""A rollback in place: a checkpoint loaded into an optimizer that has trained since it was taken.

torch.optim.Optimizer.load_state_dict replaces the whole state, so a parameter the checkpoint has
no state for (LateAdam's head.bias: no gradient before the checkpoint) starts over. Every target
of optim_state (plain, optparity's and torch's ZeRO, FSDP use_orig_params, fully_shard; through
load_optim_state_shards, and load_full_optim_state where the drop is ZeRO's own code) and
optparity's ZeRO's own load_state_dict must agree with that; torch's ZeRO's own load_state_dict
keeps the newer state (pinned below, so an upstream fix shows)."""
from __future__ import annotations

import os

import pytest

import rollback_ranks as RB
from test_optim_state import assert_same

# (flavour, how): every way a rollback in place reaches an optimizer
AGREE = [("plain", "state_dict"), ("zero", "state_dict"),
         ("plain", "shards"), ("zero", "shards"), ("zero_torch", "shards"), ("fsdp_orig", "shards"),
         ("fsdp2", "shards"), ("zero", "full"), ("zero_torch", "full"), ("fsdp_orig", "full")]


FULL = os.environ.get("OPTPARITY_TEST_LEVEL") == "full"


@pytest.mark.parametrize("ws", [2, 3] if FULL else [2])
def test_rollback_in_place_replaces_the_whole_state(ranks, ws):
    pool = ranks(ws)
    want = pool.run(RB.rollback, "plain", "fresh", timeout=300)
    # torch.optim's resume: head.bias starts over at the rollback, one step per gradient since
    assert all(w["end"]["state"]["head.bias"]["step"].item() == RB.AGAIN - 1 for w in want)
    for flavour, how in AGREE + [("zero_torch", "state_dict")]:
        got = pool.run(RB.rollback, flavour, how, timeout=300)
        for rank, (g, w) in enumerate(zip(got, want)):
            where = f"{flavour} via {how}, rank {rank} of {ws}"
            # head.bias had state before the rollback: a step for each of its gradients
            assert g["stale_step"] == RB.AGAIN - 1, where
            if (flavour, how) == ("zero_torch", "state_dict"):
                # pinned: torch's ZeRO keeps head.bias's newer state; its step runs on from there
                assert "head.bias" in g["after_load"]["state"], f"{where}: upstream got fixed?"
                assert g["end"]["state"]["head.bias"]["step"].item() == 2 * (RB.AGAIN - 1), where
                continue
            assert "head.bias" not in g["after_load"]["state"], where
            assert_same(g["after_load"], w["after_load"], where)
            assert_same(g["end"], w["end"], where)
            assert_same(g["params"], w["params"], where)
