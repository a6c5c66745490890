"""Rank-side code for test_optim_state.py (module level, so the rank pool can dispatch it).

One small model in four flavours — plain replicated parameters under ZeRO, FSDP with and
without use_orig_params, fully_shard (FSDP2) — trained with "global" gradients: at step s every
parameter's gradient is a fixed function of (s, FQN), placed on whatever part of the parameter
this rank holds. The optimizer's math is element-wise, so the same training at any world size
and in any flavour produces the same bits, and a checkpoint moved between world sizes or
flavours must continue exactly as the uninterrupted run.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

import optparity.optim as oo
from optparity.distributed import optim_state as ost
from optparity.distributed.zero_redundancy_optimizer import ZeroRedundancyOptimizer as ZeRO

FLAVOURS = ("zero", "fsdp", "fsdp_orig", "fsdp2")
HYPER = {
    "Adam": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.05),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
}
GROUP0 = ("emb.weight", "emb.bias", "head.weight", "head.bias")  # the rest: group 1 at half lr


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 7))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 5)
        self.block = Block()
        self.head = nn.Linear(7, 2)
        self.frozen = nn.Linear(2, 3)  # in the optimizer, never trained: no state anywhere
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def build_plain(full_params: dict | None = None) -> Net:
    torch.manual_seed(0)
    net = Net()
    if full_params is not None:
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(full_params[n])
    return net


def wrap(net: Net, flavour: str) -> nn.Module:
    cpu = torch.device("cpu")
    if flavour in ("fsdp", "fsdp_orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        orig = flavour == "fsdp_orig"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP's world-size-1 and deprecation notices
            net.block = FSDP(net.block, device_id=cpu, use_orig_params=orig)
            net.frozen = FSDP(net.frozen, device_id=cpu, use_orig_params=orig)
            return FSDP(net, device_id=cpu, use_orig_params=orig)
    if flavour == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        fully_shard(net.block)
        fully_shard(net.frozen)
        return fully_shard(net)
    return net


def make_optim(model: nn.Module, flavour: str, algo: str):
    cls = getattr(oo, algo)
    hyper = HYPER[algo]
    to_fqns = ost._param_to_fqns(model)
    g0, g1 = [], []
    for p in model.parameters():
        (g0 if to_fqns[p][0] in GROUP0 else g1).append(p)
    groups = [{"params": g0}, {"params": g1, "lr": hyper["lr"] * 0.5}]
    if flavour == "zero":
        return ZeRO(groups, cls, **hyper)
    return cls(groups, **hyper)


def global_grad(step: int, fqn: str, shape) -> torch.Tensor:
    seed = 1000 * step + sum((i + 1) * ord(c) for i, c in enumerate(fqn))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def set_grads(model, optim, step: int) -> None:
    """Every optimizer parameter gets this rank's part of the global gradient."""
    for slot in ost._slots(model, optim) if not isinstance(optim, ZeRO) else []:
        _place_grad(slot, step)
    if isinstance(optim, ZeRO):  # replicated: every rank sets the whole gradient
        to_fqns = ost._param_to_fqns(model)
        for p in model.parameters():
            p.grad = global_grad(step, to_fqns[p][0], p.shape) if p.requires_grad else None


def _place_grad(slot, step: int) -> None:
    p = slot.param
    if not p.requires_grad:
        p.grad = None
        return
    if slot.kind == "whole":
        p.grad = global_grad(step, slot.fqns[0], p.shape)
        return
    if not slot.pieces and slot.kind == "view1d":
        p.grad = None  # FSDP gives no gradient to a parameter outside this rank's shard
        return
    buf = torch.zeros(slot.local_shape.numel())
    for pc in slot.pieces:
        g = global_grad(step, pc.fqn, pc.shape).reshape(-1)[pc.start:pc.end]
        buf[pc.offset:pc.offset + pc.end - pc.start] = g
    buf = buf.view(slot.local_shape)
    if slot.kind == "dtensor":
        from torch.distributed.tensor import DTensor
        buf = DTensor.from_local(buf, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
    p.grad = buf


def train(model, optim, steps: range) -> None:
    for s in steps:
        set_grads(model, optim, s)
        optim.step()


def full_params(model, flavour: str) -> dict:
    """Every parameter in full, FQN keyed (upstream's gathering)."""
    if flavour in ("fsdp", "fsdp_orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model):
            return {n: p.detach().clone() for n, p in _clean_named(model)}
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.full_tensor().detach().clone() if ost._is_dtensor(p) else p.detach().clone()
    return out


def _clean_named(model):
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    for n, p in model.named_parameters():
        yield clean_tensor_name(n), p


def full_state(model, optim, flavour: str) -> dict:
    """The full FQN-keyed optimizer state, gathered by upstream's utilities where they are right."""
    if flavour == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP.full_optim_state_dict(model, optim, rank0_only=False)
    if flavour == "fsdp_orig":
        # upstream's gathering mislabels this flavour's state (test_optim_state.py pins that)
        return ost.full_optim_state_dict(model, optim, rank0_only=False)
    if flavour == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optim, options=StateDictOptions(full_state_dict=True))
    optim.consolidate_state_dict(to=0)
    sd = optim.state_dict() if dist.get_rank() == 0 else None
    holder = [sd]
    dist.broadcast_object_list(holder, src=0)
    return ost.to_fqn_keyed(holder[0], model, optim)


def normalise(full: dict) -> dict:
    """Flavour-independent view of a full state: sorted FQNs, sorted keys, groups as FQN sets."""
    # cloned: upstream hands out the live `step` tensors, which later steps would advance
    state = {f: {k: v.clone() if torch.is_tensor(v) else v for k, v in sorted(st.items())}
             for f, st in sorted(full["state"].items())}
    groups = [{**{k: v for k, v in sorted(g.items()) if k != "params"}, "params": sorted(g["params"])}
              for g in full["param_groups"]]
    return {"state": state, "param_groups": groups}


def session(rank, ws, jobs):
    """Run every job: (flavour, algo, load_from | None, save_to | None, start, segments).

    A job builds the model (from load_from/model.pt when it resumes) and its optimizer, loads
    the optimizer shards of load_from, trains segment after segment from step `start`, saves
    model.pt and this rank's shard to save_to after the first segment, and returns the
    normalised full state and the parameters after each segment."""
    warnings.filterwarnings("ignore", module="torch")  # FSDP's deprecation notices, once per call each
    results = []
    for flavour, algo, load_from, save_to, start, segments in jobs:
        params0 = None
        if load_from:
            params0 = torch.load(os.path.join(load_from, "model.pt"), weights_only=True)
        model = wrap(build_plain(params0), flavour)
        optim = make_optim(model, flavour, algo)
        if load_from:
            shards = sorted(os.path.join(load_from, f) for f in os.listdir(load_from) if f.startswith("optim"))
            ost.load_optim_state_shards(optim, model, shards)
        recorded = []
        for i, n in enumerate(segments):
            train(model, optim, range(start, start + n))
            start += n
            if save_to and i == 0:
                os.makedirs(save_to, exist_ok=True)
                weights = full_params(model, flavour)  # collective: every rank gathers
                if rank == 0:
                    torch.save(weights, os.path.join(save_to, "model.pt"))
                ost.save_optim_state_shard(optim, model, os.path.join(save_to, f"optim.{rank}.pt"))
            recorded.append((normalise(full_state(model, optim, flavour)), full_params(model, flavour)))
        dist.barrier()
        results.append(recorded)
    return results


# ---------------------------------------------------------------------------
# comparisons with upstream (run inside the ranks)
# ---------------------------------------------------------------------------

def _trained(flavour: str, algo: str = "Adam", steps: int = 3):
    model = wrap(build_plain(), flavour)
    optim = make_optim(model, flavour, algo)
    train(model, optim, range(steps))
    return model, optim


def _clone_tree(x):
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tree(v) for v in x)
    return x


def fsdp_against_upstream(rank, ws, flavour, algo):
    """Ours and upstream's FSDP optimizer-state entry points on the same trained model.
    Returns (name, ours, theirs) triples, cloned, for the driver to compare."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    warnings.filterwarnings("ignore", module="torch")
    model, optim = _trained(flavour, algo)
    out = []
    for r0 in (True, False):
        out.append((f"full_optim_state_dict(rank0_only={r0})", ost.full_optim_state_dict(model, optim, rank0_only=r0),
                    FSDP.full_optim_state_dict(model, optim, rank0_only=r0)))
    out.append(("optim_state_dict", ost.optim_state_dict(model, optim), FSDP.optim_state_dict(model, optim)))
    # the single-process optimizer fed the same gradients: what the full state must be
    plain = build_plain()
    popt = make_optim(plain, "plain", algo)
    train(plain, popt, range(3))
    out.append(("full vs single process", normalise(ost.full_optim_state_dict(model, optim, rank0_only=False)),
                normalise(ost.to_fqn_keyed(popt.state_dict(), plain, popt))))
    # loading: both sides take the same (correct) full dict
    full = ost.full_optim_state_dict(model, optim, rank0_only=False)
    frozen_full = _clone_tree(full)
    out.append(("optim_state_dict_to_load", ost.optim_state_dict_to_load(model, optim, full),
                FSDP.optim_state_dict_to_load(model, optim, full)))
    out.append(("shard_full_optim_state_dict", ost.shard_full_optim_state_dict(full, model, optim=optim),
                FSDP.shard_full_optim_state_dict(full, model, optim=optim)))
    out.append(("scatter_full_optim_state_dict",
                ost.scatter_full_optim_state_dict(full if rank == 0 else None, model, optim=optim),
                FSDP.scatter_full_optim_state_dict(full if rank == 0 else None, model, optim=optim)))
    out.append(("our loaders leave the input unchanged", full, frozen_full))
    return _clone_tree(out)


def fsdp2_against_upstream(rank, ws, algo):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict as up_get, set_optimizer_state_dict as up_set)
    warnings.filterwarnings("ignore", module="torch")
    model, optim = _trained("fsdp2", algo)
    out = []
    for full, off in ((True, True), (True, False), (False, False), (False, True)):
        opts = StateDictOptions(full_state_dict=full, cpu_offload=off)
        ours, theirs = ost.get_optimizer_state_dict(model, optim, options=opts), up_get(model, optim, options=opts)
        if not full:  # DTensor state: compare each rank's local shards and the global metadata
            ours, theirs = _dtensor_view(ours), _dtensor_view(theirs)
        out.append((f"get_optimizer_state_dict(full={full}, cpu_offload={off})", ours, theirs))
    full_sd = up_get(model, optim, options=StateDictOptions(full_state_dict=True))
    sharded_sd = up_get(model, optim)
    for name, sd, opts in (("full", full_sd, StateDictOptions(full_state_dict=True)),
                           ("sharded", sharded_sd, StateDictOptions())):
        m1, o1 = _trained("fsdp2", algo, steps=1)
        m2, o2 = _trained("fsdp2", algo, steps=1)
        ost.set_optimizer_state_dict(m1, o1, sd, options=opts)
        up_set(m2, o2, sd, options=opts)
        out.append((f"set_optimizer_state_dict({name})", _dtensor_view(o1.state_dict()), _dtensor_view(o2.state_dict())))
    return _clone_tree(out)


def _dtensor_view(sd):
    def conv(v):
        if ost._is_dtensor(v):
            return {"local": v.to_local().clone(), "shape": tuple(v.shape), "placements": repr(v.placements)}
        return v
    return {"state": {k: {kk: conv(vv) for kk, vv in st.items()} for k, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}
