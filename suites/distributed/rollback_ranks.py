"""Rank-side code for test_optim_state_rollback.py: reloading a checkpoint into an optimizer that has trained
since (a rollback in place), on every target of optim_state and through ZeRO's own
load_state_dict.

The checkpoint is taken after step 0 of LateAdam (optim_state_ranks.py): `head.bias` has had no
gradient yet, so the checkpoint has no state for it. The optimizer then trains on, gets state for
`head.bias`, loads the checkpoint in place and trains again. torch.optim's load_state_dict
replaces the whole state, so `head.bias` starts over; a target that merges keeps its newer state
(its `step` runs on from the later value).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import optim_state_ranks as R
from optparity.distributed import optim_state as ost

SAVE_AFTER = 1  # steps before the checkpoint (head.bias gets its first gradient at step LATE[1])
AGAIN = 6       # steps after it, before the rollback, and again after it
ALGO = "LateAdam"


def _optim(model, flavour: str):
    """LateAdam for `flavour`; "zero_torch" is torch's ZeroRedundancyOptimizer."""
    if flavour != "zero_torch":
        return R.make_optim(model, "zero" if flavour == "zero" else "plain", ALGO)
    from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer(R.optim_groups(model, ALGO), R.LateAdam, **R.EXTRA_HYPER[ALGO])


def _model(flavour: str):
    return R.wrap(R.build_plain(), "zero" if flavour.startswith("zero") else flavour)


def _gather_as(flavour: str) -> str:
    """The flavour name optim_state_ranks gathers full state and parameters under."""
    return {"zero_torch": "zero", "plain": "zero_plain"}.get(flavour, flavour)


def _state_of(model, optim, flavour: str) -> dict:
    return R.normalise(R.full_state(model, optim, _gather_as(flavour)))


def _whole_dict(optim, flavour: str):
    """The optimizer's own state_dict (ZeRO: consolidated on rank 0 and shared), a private copy."""
    if flavour.startswith("zero"):
        optim.consolidate_state_dict(to=0)
        holder = [optim.state_dict() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        return R._clone_tree(holder[0])  # rank 0's holds the live state tensors, as torch.optim's does
    return R._clone_tree(optim.state_dict())


def rollback(rank, ws, flavour: str, how: str):
    """Train, checkpoint, train on, roll back in place, train again; the full state after it.

    how: "shards" (optim_state.save/load_optim_state_shards, every flavour), "full" (the shards
    merged into one FQN-keyed dict, loaded with optim_state.load_full_optim_state), "state_dict" (the
    optimizer's own state_dict/load_state_dict: plain torch.optim, either ZeRO) or "fresh" (the
    reference: a new optimizer loads the checkpoint, as torch.optim would resume)."""
    warnings.filterwarnings("ignore", module="torch")
    model = _model(flavour)
    optim = _optim(model, flavour)
    R.train(model, optim, range(0, SAVE_AFTER))
    if how in ("shards", "full"):
        shard = ost.optim_state_shard(optim, model)
        shards: list = [None] * ws
        dist.all_gather_object(shards, shard)
    else:
        saved = _whole_dict(optim, flavour)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    R.train(model, optim, range(SAVE_AFTER, SAVE_AFTER + AGAIN))
    stale = _state_of(model, optim, flavour)["state"]["head.bias"]["step"].item()
    if how == "fresh":  # the model rolls back too, and a new optimizer resumes from the checkpoint
        model = _model(flavour)
        optim = _optim(model, flavour)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
    else:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
    if how == "shards":
        ost.load_optim_state_shards(optim, model, shards)
    elif how == "full":
        ost.load_full_optim_state(optim, model, ost.shards_to_full(shards))
    else:
        optim.load_state_dict(saved)
    after_load = _state_of(model, optim, flavour)
    R.train(model, optim, range(SAVE_AFTER, SAVE_AFTER + AGAIN))
    dist.barrier()
    return {"stale_step": stale, "after_load": after_load, "end": _state_of(model, optim, flavour),
            "params": R.full_params(model, _gather_as(flavour))}
