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


class LegacySGD(oo.SGD):
    """SGD as torch 1.x kept its state: momentum=0 stores {"momentum_buffer": None} for every
    parameter that had a gradient (torch 2 SGD loads such checkpoints and keeps the None).
    Non-tensor state, alongside SGD momentum=0 of torch 2 (no state at all)."""

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group["momentum"] == 0:
                for p in group["params"]:
                    if p.grad is not None:
                        self.state[p].setdefault("momentum_buffer", None)
        return loss


class LateAdam(oo.Adam):
    """Adam whose `head.bias` gets no gradient before step LATE_STEP (set_grads): until then it
    has no state, while the other parameters have."""


LATE = ("head.bias", 2)
# non-tensor and absent state: not in HYPER (the core matrix), used by their own tests
EXTRA_HYPER = {
    "SGD0": dict(lr=0.05, momentum=0.0, weight_decay=0.01),
    "LegacySGD": dict(lr=0.05, momentum=0.0, weight_decay=0.01),
    "LateAdam": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.01),
}
_CLASSES = {"SGD0": oo.SGD, "LegacySGD": LegacySGD, "LateAdam": LateAdam}


SMALL = (3, 5, 7, 2)     # emb in, emb out = block in, block out, head out
LARGE = (1024, 2048, 2048, 1024)  # 8.4M parameters: AdamW state 67 MB, for the memory figures


class Block(nn.Module):
    def __init__(self, d_in=5, d_out=7):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d_out))


class Net(nn.Module):
    def __init__(self, dims=SMALL):
        super().__init__()
        self.emb = nn.Linear(dims[0], dims[1])
        self.block = Block(dims[1], dims[2])
        self.head = nn.Linear(dims[2], dims[3])
        self.frozen = nn.Linear(2, 3)  # in the optimizer, never trained: no state anywhere
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def build_plain(full_params: dict | None = None, dims=SMALL) -> Net:
    torch.manual_seed(0)
    net = Net(dims)
    if full_params is not None:
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(full_params[n])
    return net


def device_for(backend: str) -> torch.device:
    """Where the ranks' modules live: the rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def wrap(net: Net, flavour: str, device: torch.device = torch.device("cpu"), mesh: bool = False) -> nn.Module:
    """`flavour` of `net`; mesh: FSDP built with a 1-D device_mesh (DTensor sharded optimizer state)."""
    cpu = device
    net = net.to(device)
    if flavour in ("fsdp", "fsdp_orig"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        orig = flavour == "fsdp_orig"
        kw = dict(device_id=cpu, use_orig_params=orig)
        if mesh:
            from torch.distributed.device_mesh import init_device_mesh
            kw["device_mesh"] = init_device_mesh(device.type, (dist.get_world_size(),))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FSDP's world-size-1 and deprecation notices
            net.block = FSDP(net.block, **kw)
            net.frozen = FSDP(net.frozen, **kw)
            return FSDP(net, **kw)
    if flavour == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        fully_shard(net.block, mesh=mesh)
        fully_shard(net.frozen, mesh=mesh)
        return fully_shard(net, mesh=mesh)
    return net


def optim_groups(model: nn.Module, algo: str) -> list[dict]:
    """The two parameter groups every optimizer here is built with (group 1 at half lr)."""
    hyper = HYPER.get(algo) or EXTRA_HYPER[algo]
    to_fqns = ost._param_to_fqns(model)
    g0, g1 = [], []
    for p in model.parameters():
        (g0 if to_fqns[p][0] in GROUP0 else g1).append(p)
    return [{"params": g0}, {"params": g1, "lr": hyper["lr"] * 0.5}]


def make_optim(model: nn.Module, flavour: str, algo: str):
    cls = _CLASSES.get(algo) or getattr(oo, algo)
    hyper = HYPER.get(algo) or EXTRA_HYPER[algo]
    groups = optim_groups(model, algo)
    if flavour == "zero":
        return ZeRO(groups, cls, **hyper)
    return cls(groups, **hyper)


def global_grad(step: int, fqn: str, shape) -> torch.Tensor:
    seed = 1000 * step + sum((i + 1) * ord(c) for i, c in enumerate(fqn))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def set_grads(model, optim, step: int) -> None:
    """Every optimizer parameter gets this rank's part of the global gradient (LateAdam: none for
    LATE's parameter before LATE's step)."""
    late = LATE[0] if isinstance(ost._inner(optim), LateAdam) and step < LATE[1] else None
    for slot in ost._slots(model, optim) if not isinstance(optim, ZeRO) else []:
        if late in slot.fqns:
            if slot.kind == "flat":
                raise ValueError("LateAdam needs a flavour that keeps parameters apart (not FSDP's FlatParameter)")
            slot.param.grad = None
            continue
        _place_grad(slot, step)
    if isinstance(optim, ZeRO):  # replicated: every rank sets the whole gradient
        to_fqns = ost._param_to_fqns(model)
        for p in model.parameters():
            use = p.requires_grad and to_fqns[p][0] != late
            p.grad = global_grad(step, to_fqns[p][0], p.shape).to(p.device) if use else None


def _place_grad(slot, step: int) -> None:
    p = slot.param
    if not p.requires_grad:
        p.grad = None
        return
    if slot.kind == "whole":
        p.grad = global_grad(step, slot.fqns[0], p.shape).to(p.device)
        return
    if not slot.pieces and slot.kind == "view1d":
        p.grad = None  # FSDP gives no gradient to a parameter outside this rank's shard
        return
    buf = torch.zeros(slot.local_shape.numel())
    for pc in slot.pieces:
        g = global_grad(step, pc.fqn, pc.shape).reshape(-1)[pc.start:pc.end]
        buf[pc.offset:pc.offset + pc.end - pc.start] = g
    buf = buf.view(slot.local_shape).to(ost._local(p).device)
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
    if flavour == "zero_plain":  # a plain optimizer (every rank holds everything)
        return ost.to_fqn_keyed(optim.state_dict(), model, optim)
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

def _trained(flavour: str, algo: str = "Adam", steps: int = 3, backend: str = "gloo", mesh: bool = False):
    model = wrap(build_plain(), flavour, device_for(backend), mesh=mesh)
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


def fsdp_against_upstream(rank, ws, flavour, algo, backend="gloo"):
    """Ours and upstream's FSDP optimizer-state entry points on the same trained model.
    Returns (name, ours, theirs) triples, cloned, for the driver to compare."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    warnings.filterwarnings("ignore", module="torch")
    model, optim = _trained(flavour, algo, backend=backend)
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


def _sharded_view(x):
    """A ShardedTensor as plain data: its local shards (offsets, tensor) and global metadata."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    if isinstance(x, ShardedTensor):
        md = x.metadata()
        return {"size": tuple(md.size), "dtype": md.tensor_properties.dtype,
                "shards": [(tuple(m.shard_offsets), tuple(m.shard_sizes), str(m.placement)) for m in md.shards_metadata],
                "local": [(tuple(s.metadata.shard_offsets), str(s.metadata.placement), s.tensor.detach().clone())
                          for s in x.local_shards()]}
    if isinstance(x, dict):
        return {k: _sharded_view(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_sharded_view(v) for v in x]
    return _clone_tree(x)


def fsdp_sharded_against_upstream(rank, ws, flavour, algo, backend="gloo"):
    """Ours and upstream's sharded (ShardedTensor) optimizer-state entry points and the
    rank0_only FULL_STATE_DICT load, on the same trained model: (name, ours, theirs) triples."""
    from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                        FullyShardedDataParallel as FSDP, StateDictType)
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)
    model, optim = _trained(flavour, algo, backend=backend)
    out = []
    ours_sd = ost.sharded_optim_state_dict(model, optim)
    out.append(("sharded_optim_state_dict", _sharded_view(ours_sd),
                _sharded_view(FSDP.sharded_optim_state_dict(model, optim))))
    for kind in (StateDictType.SHARDED_STATE_DICT, StateDictType.LOCAL_STATE_DICT):
        with FSDP.state_dict_type(model, kind):
            out.append((f"optim_state_dict({kind.name})", _sharded_view(ost.optim_state_dict(model, optim)),
                        _sharded_view(FSDP.optim_state_dict(model, optim))))
    # loading: both sides take our (correct) sharded dict
    before = _sharded_view(ours_sd)
    out.append(("flatten_sharded_optim_state_dict", ost.flatten_sharded_optim_state_dict(ours_sd, model, optim),
                FSDP.flatten_sharded_optim_state_dict(ours_sd, model, optim)))
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        out.append(("optim_state_dict_to_load(SHARDED_STATE_DICT)", ost.optim_state_dict_to_load(model, optim, ours_sd),
                    FSDP.optim_state_dict_to_load(model, optim, ours_sd)))
    out.append(("our sharded loaders leave the input unchanged", _sharded_view(ours_sd), before))
    full = ost.full_optim_state_dict(model, optim, rank0_only=False)
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                              FullOptimStateDictConfig(rank0_only=True)):
        given = full if rank == 0 else {}
        out.append(("optim_state_dict_to_load(FULL, rank0_only)", ost.optim_state_dict_to_load(model, optim, given),
                    FSDP.optim_state_dict_to_load(model, optim, _clone_tree(given))))
    return _clone_tree(out)


def _state_for_empty_shards(model, optim) -> list[str]:
    """use_orig_params: one step on zero gradients for the parameters with no elements on this
    rank (as NamedOptimizer.init_state gives them), so the optimizer holds (empty) state for them."""
    empty = [s for s in ost._slots(model, optim) if s.kind == "view1d" and not s.pieces and s.param.requires_grad]
    for p in model.parameters():
        p.grad = None
    for s in empty:
        s.param.grad = torch.zeros_like(s.param)
    if empty:
        optim.step()
    return [s.fqns[0] for s in empty]


def fsdp_named_against_upstream(rank, ws, flavour, algo, backend="gloo"):
    """optim_state_dict_to_load(is_named_optimizer=True) under FULL, FULL rank0_only and SHARDED
    state_dict_type, ours and upstream's, on the same trained model and the same (our) dicts;
    with use_orig_params the parameters with no elements on a rank hold (empty) state first."""
    from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                        FullyShardedDataParallel as FSDP, StateDictType)
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)
    model, optim = _trained(flavour, algo, backend=backend)
    full = ost.full_optim_state_dict(model, optim, rank0_only=False)
    sharded = ost.sharded_optim_state_dict(model, optim)
    empty = _state_for_empty_shards(model, optim) if flavour == "fsdp_orig" else []
    out = [("parameters with empty shards here", len(empty), len(empty))]
    out.append(("FULL", ost.optim_state_dict_to_load(model, optim, full, is_named_optimizer=True),
                FSDP.optim_state_dict_to_load(model, optim, _clone_tree(full), is_named_optimizer=True)))
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                              FullOptimStateDictConfig(rank0_only=True)):
        given = full if rank == 0 else {}
        out.append(("FULL rank0_only", ost.optim_state_dict_to_load(model, optim, given, is_named_optimizer=True),
                    FSDP.optim_state_dict_to_load(model, optim, _clone_tree(given), is_named_optimizer=True)))
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        out.append(("SHARDED", ost.optim_state_dict_to_load(model, optim, sharded, is_named_optimizer=True),
                    FSDP.optim_state_dict_to_load(model, optim, sharded, is_named_optimizer=True)))
    return _clone_tree(out)


def fsdp_dtensor_against_upstream(rank, ws, flavour, algo, backend="gloo"):
    """FSDP built with a device_mesh: under SHARDED_STATE_DICT the optimizer state is DTensor
    (the config's _use_dtensor); optim_state_dict and optim_state_dict_to_load, ours and
    upstream's; LOCAL_STATE_DICT refused by both."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)
    model, optim = _trained(flavour, algo, backend=backend, mesh=True)
    out = []
    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        ours, theirs = ost.optim_state_dict(model, optim), FSDP.optim_state_dict(model, optim)
        assert FSDP.get_state_dict_type(model).optim_state_dict_config._use_dtensor
        out.append(("optim_state_dict(SHARDED, device_mesh)", _dtensor_view(ours), _dtensor_view(theirs)))
        out.append(("types", sorted({type(v).__name__ for st in ours["state"].values() for v in st.values()}),
                    sorted({type(v).__name__ for st in theirs["state"].values() for v in st.values()})))
        before = _dtensor_view(ours)
        out.append(("optim_state_dict_to_load(SHARDED, device_mesh)", ost.optim_state_dict_to_load(model, optim, ours),
                    FSDP.optim_state_dict_to_load(model, optim, ours)))
        out.append(("our loader leaves the input unchanged", _dtensor_view(ours), before))
    errors = []
    for fn in (ost.optim_state_dict, FSDP.optim_state_dict):
        try:
            with FSDP.state_dict_type(model, StateDictType.LOCAL_STATE_DICT):
                fn(model, optim)
            errors.append(None)
        except RuntimeError as e:
            errors.append(str(e))
    out.append(("LOCAL_STATE_DICT with a device_mesh", *errors))
    return _clone_tree(out)


def scatter_bad_input(rank, ws):
    """Rank 0 passes a full dict with a wrong-shaped state tensor: every rank must raise (no
    rank left waiting in a collective), naming the FQN, with rank 0's dict unchanged."""
    warnings.filterwarnings("ignore", module="torch")
    model, optim = _trained("fsdp", "Adam")
    full = ost.full_optim_state_dict(model, optim, rank0_only=False)
    full["state"]["head.bias"]["exp_avg"] = torch.zeros(3)
    before = _clone_tree(full)
    try:
        ost.scatter_full_optim_state_dict(full if rank == 0 else None, model, optim=optim)
    except ost.OptimStateError as e:
        return str(e), full, before
    return None, full, before


def fsdp2_against_upstream(rank, ws, algo, backend="gloo"):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict as up_get, set_optimizer_state_dict as up_set)
    warnings.filterwarnings("ignore", module="torch")
    model, optim = _trained("fsdp2", algo, backend=backend)
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
                           ("full, broadcast_from_rank0", full_sd,
                            StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)),
                           ("sharded", sharded_sd, StateDictOptions())):
        for steps in (1, 0):  # into a trained optimizer, and into a fresh one (upstream steps it first)
            m1, o1 = _trained("fsdp2", algo, steps=steps, backend=backend)
            m2, o2 = _trained("fsdp2", algo, steps=steps, backend=backend)
            given, before = _clone_tree(sd), _clone_tree(sd)
            ost.set_optimizer_state_dict(m1, o1, given, options=opts)
            theirs = _outcome(lambda: up_set(m2, o2, _clone_tree(sd), options=opts))
            what = f"set_optimizer_state_dict({name}) into {'a trained' if steps else 'a fresh'} optimizer"
            if theirs is not None:  # upstream raised (every rank alike, before any collective)
                # pinned: upstream's full route needs a tensor in the optimizer's state to find a device
                out.append((what + ": upstream raises", UPSTREAM_SET_NO_TENSOR_STATE, theirs))
                got = ost.get_optimizer_state_dict(m1, o1, options=StateDictOptions(full_state_dict=True))
                out.append((what + ": ours holds the checkpoint's state", got["state"], sd["state"]))
                continue
            # the optimizers themselves, not their state_dict(): param_groups' key order and value
            # types (upstream's full route turns the betas tuple into a list) are compared too
            out.append((what, _optimizer_view(o1), _optimizer_view(o2)))
            train(m1, o1, range(3, 5))
            train(m2, o2, range(3, 5))
            out.append((what + ", 2 steps on", _optimizer_view(o1), _optimizer_view(o2)))
            out.append((what + ": the caller's dict unchanged", _dtensor_view(given), _dtensor_view(before)))
    return _clone_tree(out)


UPSTREAM_SET_NO_TENSOR_STATE = ("raised", "AssertionError", "Expected device to be set")
UPSTREAM_RANK0_LOAD_NONE_STATE = ("raised", "AttributeError", "'NoneType' object has no attribute 'cpu'")


def _optimizer_view(optim):
    """An optimizer's live state and param_groups, parameters by position."""
    index = {p: i for i, p in enumerate(q for g in optim.param_groups for q in g["params"])}
    state = {index[p]: st for p, st in sorted(optim.state.items(), key=lambda kv: index[kv[0]])}
    order = [index[p] for p in optim.state]  # the state's own order too
    groups = [{k: ([index[p] for p in v] if k == "params" else v) for k, v in g.items()} for g in optim.param_groups]
    return _dtensor_view({"state": state, "param_groups": groups}) | {"state order": order}


def _dtensor_view(sd):
    def conv(v):
        if ost._is_dtensor(v):
            return {"local": v.to_local().clone(), "shape": tuple(v.shape), "placements": repr(v.placements)}
        return v
    return {"state": {k: {kk: conv(vv) for kk, vv in st.items()} for k, st in sd["state"].items()},
            "param_groups": sd["param_groups"]}


# ---------------------------------------------------------------------------
# memory per rank of each route (python suites/distributed/optim_state_ranks.py --memory)
# ---------------------------------------------------------------------------

def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _steady_malloc() -> None:
    """Every large block mmap'd and returned on free, so the peak-RSS delta of a route is what it
    touches, not what an earlier free happened to leave in the heap."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD 64 KiB (fixed: no dynamic raise)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD 64 KiB


MEMORY_SAVE = ("shards (FSDP)", "shards (ZeRO)", "optparity full_optim_state_dict",
               "FSDP.full_optim_state_dict", "ZeRO consolidate_state_dict")
MEMORY_LOAD = ("shards -> FSDP", "shards -> ZeRO", "optparity scatter_full_optim_state_dict",
               "FSDP.scatter_full_optim_state_dict", "FSDP.shard_full_optim_state_dict (each rank reads the file)",
               "ZeRO load_state_dict (each rank reads the file)")


def memory_route(rank, ws, route: str, ckpt: str) -> dict:
    """Peak RSS growth (VmHWM after resetting it, minus VmRSS before) of one route on this rank,
    in a process that ran nothing else; model LARGE, AdamW, one step of training first."""
    import gc
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)  # FSDP's deprecation notices name the caller
    _steady_malloc()
    flavour = "zero" if "ZeRO" in route else "fsdp"
    model = wrap(build_plain(dims=LARGE), flavour)
    optim = make_optim(model, flavour, "AdamW")
    if route in MEMORY_SAVE:
        train(model, optim, range(1))
    optim.zero_grad(set_to_none=True)
    gc.collect()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    shard_files = [os.path.join(ckpt, f"optim.{r}.pt") for r in range(4)]
    full_file = os.path.join(ckpt, "full.pt")
    if route in ("shards (FSDP)", "shards (ZeRO)"):
        if flavour == "fsdp":  # the load routes read these
            ost.save_optim_state_shard(optim, model, os.path.join(ckpt, f"optim.{rank}.pt"))
        else:
            ost.save_optim_state_shard(optim, model, os.path.join(ckpt, f"zero.{rank}.pt"))
    elif route == "optparity full_optim_state_dict":
        sd = ost.full_optim_state_dict(model, optim, rank0_only=True)
        if rank == 0:
            torch.save(sd, os.path.join(ckpt, "full-ours.pt"))
        del sd
    elif route == "FSDP.full_optim_state_dict":
        sd = FSDP.full_optim_state_dict(model, optim, rank0_only=True)
        if rank == 0:
            torch.save(sd, full_file)
        del sd
    elif route == "ZeRO consolidate_state_dict":
        optim.consolidate_state_dict(to=0)
        if rank == 0:
            torch.save(optim.state_dict(), os.path.join(ckpt, "zero-full.pt"))
        optim._all_state_dicts = []  # what a caller keeping only the file would free
    elif route.startswith("shards -> "):
        ost.load_optim_state_shards(optim, model, shard_files)
    elif route.endswith("scatter_full_optim_state_dict"):
        full = torch.load(full_file, weights_only=True) if rank == 0 else None
        scatter = ost.scatter_full_optim_state_dict if route.startswith("optparity") else FSDP.scatter_full_optim_state_dict
        optim.load_state_dict(scatter(full, model, optim=optim))
        del full
    elif route.startswith("FSDP.shard_full"):
        full = torch.load(full_file, weights_only=True)
        optim.load_state_dict(FSDP.shard_full_optim_state_dict(full, model, optim=optim))
        del full
    elif route.startswith("ZeRO load_state_dict"):
        optim.load_state_dict(torch.load(os.path.join(ckpt, "zero-full.pt"), weights_only=True))
    else:
        raise ValueError(route)
    gc.collect()
    dist.barrier()
    peak = _status_kb("VmHWM") - base
    held = sum(v.numel() * v.element_size() for st in ost._inner(optim).state.values() for v in st.values() if torch.is_tensor(v))
    return {"peak_mb": peak / 1024, "held_mb": held / 2**20}


def measure_memory(ckpt: str, n: int = 4, m: int = 2) -> list[tuple[str, int, list[dict]]]:
    """Every route in a fresh process group: save at n ranks, load the n shards / the full file at m."""
    from optparity.harness.ranks import RankPool
    out = []
    for route in MEMORY_SAVE + MEMORY_LOAD:
        ws = n if route in MEMORY_SAVE else m
        with RankPool(ws, "gloo", timeout=600, collective_timeout=600) as pool:
            out.append((route, ws, pool.run(memory_route, route, ckpt, timeout=900)))
        print(f"{route:<62} ({ws} ranks): " + ", ".join(f"{r['peak_mb']:.0f}" for r in out[-1][2]) + " MB", flush=True)
    return out


if __name__ == "__main__":
    import sys
    import tempfile
    if sys.argv[1:] != ["--memory"]:
        raise SystemExit("usage: python suites/distributed/optim_state_ranks.py --memory")
    state_mb = 2 * sum(p.numel() for p in build_plain(dims=LARGE).parameters() if p.requires_grad) * 4 / 2**20
    print(f"AdamW state S = {state_mb:.1f} MiB (exp_avg, exp_avg_sq; model {LARGE}); peak RSS growth per rank, MiB:")
    import optim_state_ranks as R  # so the ranks unpickle the route by its module name
    with tempfile.TemporaryDirectory() as d:
        R.measure_memory(d)


# ---------------------------------------------------------------------------
# non-tensor and absent state against upstream (run inside the ranks)
# ---------------------------------------------------------------------------

def _outcome(fn):
    """fn()'s result, or ("raised", type, last line) where it raises."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - upstream's failure is compared, not hidden
        return ("raised", type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")


def state_kinds_against_upstream(rank, ws, flavour, algo, rank0_loads=True, backend="gloo"):
    """Every FSDP entry point, ours and upstream's, on a model whose optimizer holds non-tensor
    state (LegacySGD: None), no state at all (SGD0), or no state for some parameters (frozen ones
    always; LateAdam: head.bias before its first gradient); 0-dim `step` tensors with Adam.
    rank0_loads=False leaves out upstream's rank0_only loaders (they raise on rank 0 only with
    None state, which would leave the other ranks in a collective)."""
    from torch.distributed.fsdp import (FullOptimStateDictConfig, FullStateDictConfig,
                                        FullyShardedDataParallel as FSDP, StateDictType)
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)
    model, optim = _trained(flavour, algo, steps=LATE[1] if algo == "LateAdam" else 3, backend=backend)
    out = []
    plain = build_plain()
    popt = make_optim(plain, "plain", algo)
    train(plain, popt, range(LATE[1] if algo == "LateAdam" else 3))
    full = ost.full_optim_state_dict(model, optim, rank0_only=False)
    frozen_full = _clone_tree(full)
    out.append(("full vs single process", normalise(full), normalise(ost.to_fqn_keyed(popt.state_dict(), plain, popt))))
    for r0 in (True, False):
        out.append((f"full_optim_state_dict(rank0_only={r0})", ost.full_optim_state_dict(model, optim, rank0_only=r0),
                    _outcome(lambda: FSDP.full_optim_state_dict(model, optim, rank0_only=r0))))
    out.append(("optim_state_dict", ost.optim_state_dict(model, optim), _outcome(lambda: FSDP.optim_state_dict(model, optim))))
    sharded = ost.sharded_optim_state_dict(model, optim)
    out.append(("sharded_optim_state_dict", _sharded_view(sharded),
                _outcome(lambda: _sharded_view(FSDP.sharded_optim_state_dict(model, optim)))))
    out.append(("optim_state_dict_to_load", ost.optim_state_dict_to_load(model, optim, full),
                _outcome(lambda: FSDP.optim_state_dict_to_load(model, optim, _clone_tree(full)))))
    out.append(("optim_state_dict_to_load(is_named_optimizer)",
                ost.optim_state_dict_to_load(model, optim, full, is_named_optimizer=True),
                _outcome(lambda: FSDP.optim_state_dict_to_load(model, optim, _clone_tree(full), is_named_optimizer=True))))
    out.append(("shard_full_optim_state_dict", ost.shard_full_optim_state_dict(full, model, optim=optim),
                _outcome(lambda: FSDP.shard_full_optim_state_dict(_clone_tree(full), model, optim=optim))))
    out.append(("flatten_sharded_optim_state_dict", ost.flatten_sharded_optim_state_dict(sharded, model, optim),
                _outcome(lambda: FSDP.flatten_sharded_optim_state_dict(sharded, model, optim))))
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True),
                              FullOptimStateDictConfig(rank0_only=True)):
        given = full if rank == 0 else {}
        ours = ost.optim_state_dict_to_load(model, optim, given)
        out.append(("optim_state_dict_to_load(FULL, rank0_only)", ours,
                    _outcome(lambda: FSDP.optim_state_dict_to_load(model, optim, _clone_tree(given)))
                    if rank0_loads else ours))
    ours = ost.scatter_full_optim_state_dict(full if rank == 0 else None, model, optim=optim)
    out.append(("scatter_full_optim_state_dict", ours,
                _outcome(lambda: FSDP.scatter_full_optim_state_dict(_clone_tree(full) if rank == 0 else None, model,
                                                                    optim=optim)) if rank0_loads else ours))
    out.append(("our loaders leave the input unchanged", full, frozen_full))
    return _clone_tree(out)


# ---------------------------------------------------------------------------
# NamedOptimizer checkpoints to and from every flavour (run inside the ranks)
# ---------------------------------------------------------------------------

def make_named(model: nn.Module, algo: str, upstream: bool = False):
    """NamedOptimizer (ours over optparity, or torch's _NamedOptimizer over torch.optim) with the
    same two groups as make_optim."""
    from optparity.distributed.named_optimizer import NamedOptimizer
    cls = NamedOptimizer
    family = oo
    if upstream:
        from torch.distributed.optim import _NamedOptimizer as cls
        family = torch.optim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Since we pass in param_groups ..."
        return cls(model.named_parameters(), getattr(family, algo), optim_groups(model, algo), None, **HYPER[algo])


def named_cross_load(rank, ws, algo, tmp):
    """A checkpoint written by NamedOptimizer after K1 steps loads into a plain optimizer (our
    to_id_keyed), ZeRO, FSDP (both flavours) and fully_shard, and every flavour's checkpoint (full
    FQN dict or shard files) loads into NamedOptimizer (ours and upstream's): K2 more steps
    equal the uninterrupted single-process run. Returns (name, got, want) triples."""
    warnings.filterwarnings("ignore", module="torch")
    warnings.simplefilter("ignore", FutureWarning)
    k1, k2 = 3, 2
    ref = build_plain()
    ref_opt = make_optim(ref, "plain", algo)
    train(ref, ref_opt, range(k1))
    at_k1 = normalise(ost.to_fqn_keyed(ref_opt.state_dict(), ref, ref_opt))
    dcp_order = list(ost.to_fqn_keyed(ref_opt.state_dict(), ref, ref_opt)["state"])
    params_k1 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    train(ref, ref_opt, range(k1, k1 + k2))
    want = (normalise(ost.to_fqn_keyed(ref_opt.state_dict(), ref, ref_opt)),
            {n: p.detach().clone() for n, p in ref.named_parameters()})
    out = []
    # the NamedOptimizer checkpoint, ours and upstream's
    named_sd = {}
    for upstream in (False, True):
        m = build_plain()
        opt = make_named(m, algo, upstream)
        train(m, opt, range(k1))
        named_sd[upstream] = _clone_tree(opt.state_dict())
    out.append(("NamedOptimizer.state_dict() vs torch's _NamedOptimizer", named_sd[False], named_sd[True]))
    out.append(("NamedOptimizer state order = the optimizer's = to_fqn_keyed's", list(named_sd[False]["state"]), dcp_order))
    out.append(("NamedOptimizer checkpoint = the plain optimizer's state", normalise(named_sd[False]), at_k1))
    ckpt = named_sd[False]
    before = _clone_tree(ckpt)
    # NamedOptimizer -> every flavour
    for flavour in ("plain",) + FLAVOURS:
        for route in ("load_full_optim_state", "own loader"):
            model = wrap(build_plain(params_k1), flavour)
            optim = make_optim(model, flavour, algo)
            if route == "load_full_optim_state":
                ost.load_full_optim_state(optim, model, ckpt)
            elif flavour == "plain":
                optim.load_state_dict(ost.to_id_keyed(ckpt, model, optim))
            elif flavour in ("fsdp", "fsdp_orig"):
                optim.load_state_dict(ost.optim_state_dict_to_load(model, optim, ckpt))
            elif flavour == "fsdp2":
                from torch.distributed.checkpoint.state_dict import StateDictOptions
                ost.set_optimizer_state_dict(model, optim, ckpt, options=StateDictOptions(full_state_dict=True))
            else:
                continue  # ZeRO has no FQN loader of its own
            train(model, optim, range(k1, k1 + k2))
            got = (normalise(full_state(model, optim, flavour if flavour != "plain" else "zero_plain")),
                   full_params(model, flavour))
            expected = want
            if flavour == "fsdp2" and route == "own loader":  # set(full) turns tuples into lists, as upstream
                expected = ({**want[0], "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                                                         for g in want[0]["param_groups"]]}, want[1])
            out.append((f"NamedOptimizer checkpoint -> {flavour} ({route}), {k2} steps on", got, expected))
    out.append(("the NamedOptimizer checkpoint unchanged", ckpt, before))
    # every flavour -> NamedOptimizer (full FQN dict, and shard files)
    for flavour in FLAVOURS:
        model = wrap(build_plain(), flavour)
        optim = make_optim(model, flavour, algo)
        train(model, optim, range(k1))
        full = full_state(model, optim, flavour)
        d = os.path.join(tmp, f"{flavour}-{algo}")
        os.makedirs(d, exist_ok=True)
        ost.save_optim_state_shard(optim, model, os.path.join(d, f"optim.{rank}.pt"))
        dist.barrier()
        for upstream in (False, True):
            for route in ("load_state_dict", "load_optim_state_shards"):
                if upstream and route == "load_optim_state_shards":
                    continue
                m = build_plain(params_k1)
                opt = make_named(m, algo, upstream)
                if route == "load_state_dict":
                    opt.init_state()  # NamedOptimizer loads in place into existing state
                    with torch.no_grad():  # init_state is a real step: put the weights back
                        for n, p in m.named_parameters():
                            p.copy_(params_k1[n])
                    opt.load_state_dict(_clone_tree(full))
                else:
                    ost.load_optim_state_shards(opt, m, [os.path.join(d, f"optim.{r}.pt") for r in range(ws)])
                train(m, opt, range(k1, k1 + k2))
                who = "torch's _NamedOptimizer" if upstream else "NamedOptimizer"
                got = (normalise(opt.state_dict()), {n: p.detach().clone() for n, p in m.named_parameters()})
                out.append((f"{flavour} -> {who} ({route}), {k2} steps on", got, want))
    return _clone_tree(out)
