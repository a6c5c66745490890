"""Optimizer state for sharded training: FSDP's optimizer-state API, rekeying, and re-sharding.

Three layouts meet here (all ``{"state": ..., "param_groups": [...]}``):

* **param-id keyed** — ``torch.optim.Optimizer.state_dict()``: state keyed by the position of the
  parameter in ``param_groups`` (groups concatenated); ZeRO's consolidated dict is this too.
* **FQN keyed** — NamedOptimizer, ``torch.distributed.checkpoint.state_dict`` and FSDP's full
  optimizer state dict: state keyed by the parameter's fully qualified name in the unwrapped
  model, each tensor in the parameter's own shape; ``param_groups[i]["params"]`` lists FQNs.
* **shard** (this module's checkpoint format) — what ONE rank holds, written by that rank alone:
  ``{"format", "algorithm", "world_size", "rank", "param_groups" (FQN lists), "params"
  {fqn: shape, dtype, start, end}, "kinds" {fqn: {key: elem|scalar|object}}, "state" {fqn: {key:
  value}}}``. Element-wise state is stored as the flat range ``[start, end)`` of the
  parameter's flattened elements that this rank holds; ``step`` and other scalars are stored
  whole. A ZeRO rank holds whole parameters, an FSDP rank a flat range of each, so shards from
  N ranks of any of them load at any world size M of any of them: each rank copies only the
  ranges it now owns out of memory-mapped files, and no rank ever holds the full state.

FSDP's own entry points are reimplemented over upstream's FSDP modules (``FlatParameter``
metadata, ``_get_param_to_fqns``): ``full_optim_state_dict``, ``optim_state_dict`` /
``optim_state_dict_to_load`` (FULL, SHARDED and LOCAL state_dict_type; rank0_only loads),
``sharded_optim_state_dict`` / ``flatten_sharded_optim_state_dict`` (ShardedTensor),
``shard_full_optim_state_dict``, ``scatter_full_optim_state_dict``, ``rekey_optim_state_dict``; for ``fully_shard`` (DTensor
state) ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (full and sharded). Their
outputs are bit-identical to upstream's (suites/distributed/test_optim_state.py), including
``is_named_optimizer=True`` and FSDP built with a ``device_mesh`` (DTensor sharded state); after
``set_optimizer_state_dict`` the optimizer's state and param_groups (key order, tuples turned into
lists under full_state_dict) are upstream's. A NamedOptimizer (ours or torch's) is accepted
wherever an optimizer is: its wrapped optimizer is used.

Bad input (missing or extra parameters, shape/dtype mismatches, state from another algorithm,
missing shards) raises ``OptimStateError`` naming the parameter FQN before anything is
modified; no function mutates a dict it is given. Files load with ``weights_only=True``.

Departures from upstream: ``get_optimizer_state_dict`` initialises missing state the same way
(a zero-lr step) only when the optimizer has no state at all, as upstream does;
``scatter_full_optim_state_dict`` validates a meta-tensor skeleton on every rank before any
tensor is broadcast, so bad input raises on all ranks instead of leaving some in a collective;
where torch 2.13 raises or loads the wrong thing ours loads (None state in the rank0_only
loaders, set_optimizer_state_dict(full) with no tensor state or with state the optimizer lacked,
use_orig_params gathering while a parameter has no state); a FlatParameter mixing parameters
with and without state is refused, naming them. Loading a checkpoint (``load_optim_state_shards``,
``load_full_optim_state``) replaces the whole state as torch.optim does, into torch's ZeRO too
(whose own load_state_dict keeps the state of parameters the dict lacks).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "OptimStateError", "OptimStateKeyType",
    "optim_state_shard", "save_optim_state_shard", "load_optim_state_shards",
    "shards_to_full", "load_full_optim_state",
    "full_optim_state_dict", "sharded_optim_state_dict", "flatten_sharded_optim_state_dict",
    "optim_state_dict", "optim_state_dict_to_load",
    "shard_full_optim_state_dict", "scatter_full_optim_state_dict",
    "rekey_optim_state_dict", "to_fqn_keyed", "to_id_keyed",
    "get_optimizer_state_dict", "set_optimizer_state_dict",
]

FORMAT = "optparity.optim_state.shard/1"


class OptimStateError(ValueError):
    """An optimizer state that cannot be loaded here; the message names the parameter."""


def _key_type():
    from torch.distributed.fsdp import OptimStateKeyType as K
    return K


class _KeyTypeProxy:
    """torch's OptimStateKeyType, resolved lazily (importing FSDP is slow)."""

    def __getattr__(self, name):
        return getattr(_key_type(), name)


OptimStateKeyType = _KeyTypeProxy()


# ---------------------------------------------------------------------------
# where each optimizer parameter's elements live on this rank
# ---------------------------------------------------------------------------

@dataclass
class _Piece:
    fqn: str
    shape: torch.Size      # the original parameter's full shape
    dtype: torch.dtype
    start: int             # range of the parameter's flattened elements held here
    end: int
    offset: int            # where that range starts in the local (flattened) state tensor


@dataclass
class _Slot:
    param: torch.Tensor    # the tensor the optimizer holds
    kind: str              # whole | flat (FSDP FlatParameter) | view1d (FSDP use_orig_params) | dtensor
    local_shape: torch.Size
    pieces: list = field(default_factory=list)
    fqns: list = field(default_factory=list)  # every FQN the optimizer parameter stands for


def _is_zero(optim) -> bool:
    return hasattr(optim, "_partition_parameters") and hasattr(optim, "optim") and hasattr(optim, "_param_to_rank")


def _is_named(optim) -> bool:
    """A NamedOptimizer (ours or torch's _NamedOptimizer): FQN-keyed state_dict over `_optimizer`."""
    return hasattr(optim, "_optimizer") and hasattr(optim, "ordered_param_keys")


def _unnamed(optim):
    """The optimizer that takes param-id keyed state dicts (a NamedOptimizer's wrapped one)."""
    return optim._optimizer if _is_named(optim) else optim


def _inner(optim):
    """The optimizer whose `state` holds the tensors (ZeRO's local optimizer, a NamedOptimizer's
    wrapped one)."""
    optim = _unnamed(optim)
    return optim.optim if _is_zero(optim) else optim


def _param_to_fqns(model: nn.Module) -> dict:
    from torch.distributed.fsdp._common_utils import _get_param_to_fqns
    return _get_param_to_fqns(model)


def _orig_param_index(model: nn.Module) -> dict:
    """FSDP use_orig_params: original parameter -> (its FlatParameter, index in it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    out = {}
    for m in FSDP.fsdp_modules(model):
        handle = m._handle
        if handle is None or handle.flat_param._params is None:
            continue
        for i, p in enumerate(handle.flat_param._params):
            out[p] = (handle.flat_param, i)
    return out


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _slots(model: nn.Module, optim) -> list[_Slot]:
    """One slot per optimizer parameter this rank keeps state for, in param_groups order."""
    from torch.distributed.fsdp._flat_param import FlatParameter
    to_fqns = _param_to_fqns(model)
    orig = _orig_param_index(model)
    owned = None
    if _is_zero(optim):
        me = optim.rank
        owned = {p for p, r in optim._param_to_rank.items() if r == me}
    slots = []
    for group in optim.param_groups:
        for p in group["params"]:
            if p not in to_fqns:
                raise OptimStateError(f"an optimizer parameter of shape {tuple(p.shape)} is not a parameter of the model")
            fqns = list(to_fqns[p])
            if isinstance(p, FlatParameter):
                slot = _Slot(p, "flat", torch.Size([p.numel()]), fqns=fqns)
                for fqn, shape, info in zip(fqns, p._shapes, p._shard_param_infos):
                    if info.in_shard and info.numel_in_shard:
                        slot.pieces.append(_Piece(fqn, torch.Size(shape), p.dtype, info.intra_param_start_idx,
                                                  info.intra_param_end_idx + 1, info.offset_in_shard))
                if not slot.pieces:  # only padding here: its state still exists (zeros), as in training
                    slot.pieces.append(_Piece(fqns[0], torch.Size(p._shapes[0]), p.dtype, 0, 0, 0))
            elif p in orig:
                flat, i = orig[p]
                info = flat._shard_param_infos[i]
                slot = _Slot(p, "view1d", p.shape, fqns=fqns[:1])
                if info.in_shard and info.numel_in_shard:
                    slot.pieces.append(_Piece(fqns[0], torch.Size(flat._shapes[i]), p.dtype,
                                              info.intra_param_start_idx, info.intra_param_end_idx + 1, 0))
            elif _is_dtensor(p):
                slot = _Slot(p, "dtensor", p.to_local().shape, fqns=fqns[:1])
                start = _dtensor_start(p, fqns[0])
                n = p.to_local().numel()
                # an empty local shard still has (empty) state, and DTensor collectives need it
                slot.pieces.append(_Piece(fqns[0], p.shape, p.dtype, start, start + n, 0))
            else:
                slot = _Slot(p, "whole", p.shape, fqns=fqns[:1])
                slot.pieces.append(_Piece(fqns[0], p.shape, p.dtype, 0, p.numel(), 0))
            if owned is not None and p not in owned:
                slot.pieces = []  # another ZeRO rank keeps its state
            slots.append(slot)
    return slots


def _dtensor_start(p, fqn: str) -> int:
    """First flat element of a DTensor's local shard; only row (dim-0) sharding is contiguous."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    for pl in p.placements:
        if not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)):
            raise OptimStateError(f"{fqn!r}: placements {p.placements} are not supported (only Shard(0) and Replicate)")
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for s in p.shape[1:]:
        row *= s
    return int(offset[0]) * row if len(offset) else 0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _value_kind(key: str, value: Any, slot: _Slot, fqn: str) -> str:
    if not torch.is_tensor(value):
        return "object"
    local = _local(value)
    if local.dim() == 0 and not (slot.kind == "whole" and slot.param.dim() == 0 and key != "step"):
        return "scalar"
    if local.shape != slot.local_shape:
        raise OptimStateError(f"{fqn!r}: state {key!r} has shape {tuple(local.shape)}, its parameter "
                              f"{tuple(slot.local_shape)} here")
    return "elem"


def _groups_by_fqn(optim, slots_by_param: dict) -> list[dict]:
    out = []
    for group in optim.param_groups:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [f for p in group["params"] for f in slots_by_param[p].fqns]
        out.append(g)
    return out


def _all_slots(model, optim) -> tuple[list[_Slot], dict]:
    slots = _slots(model, optim)
    return slots, {s.param: s for s in slots}


# ---------------------------------------------------------------------------
# shards: save
# ---------------------------------------------------------------------------

def optim_state_shard(optim, model: nn.Module) -> dict[str, Any]:
    """This rank's shard of `optim`'s state (plain optimizer, either ZeRO, FSDP with or without
    use_orig_params, or fully_shard). Tensors are copies: the dict shares nothing with `optim`."""
    slots, by_param = _all_slots(model, optim)
    state = _inner(optim).state
    params, kinds, out = {}, {}, {}
    for slot in slots:
        st = state.get(slot.param) or {}
        for pc in slot.pieces:
            params[pc.fqn] = {"shape": list(pc.shape), "dtype": str(pc.dtype), "start": pc.start, "end": pc.end}
            if not st:
                continue
            kinds[pc.fqn], out[pc.fqn] = {}, {}
            for key, value in st.items():
                kind = _value_kind(key, value, slot, pc.fqn)
                kinds[pc.fqn][key] = kind
                if kind == "elem":
                    flat = _local(value).detach().reshape(-1)
                    value = flat[pc.offset:pc.offset + pc.end - pc.start]
                    out[pc.fqn][key] = value.to("cpu", copy=True).contiguous()
                elif kind == "scalar":
                    out[pc.fqn][key] = _local(value).detach().to("cpu", copy=True)
                else:
                    out[pc.fqn][key] = copy.deepcopy(value)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if _is_zero(optim):
        rank, world = optim.rank, optim.world_size
    return {"format": FORMAT, "algorithm": type(_inner(optim)).__name__, "world_size": world, "rank": rank,
            "param_groups": copy.deepcopy(_groups_by_fqn(optim, by_param)), "params": params,
            "kinds": kinds, "state": out}


def save_optim_state_shard(optim, model: nn.Module, path: str | os.PathLike) -> None:
    """Write this rank's shard (call on every rank, each with its own path)."""
    torch.save(optim_state_shard(optim, model), path)


# ---------------------------------------------------------------------------
# shards: load
# ---------------------------------------------------------------------------

def _open(src) -> dict:
    if isinstance(src, (str, os.PathLike)):
        return torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    return src


def _check_shards(shards: Sequence[dict]) -> None:
    if not shards:
        raise OptimStateError("no optimizer-state shards given")
    for i, s in enumerate(shards):
        if not isinstance(s, dict) or s.get("format") != FORMAT:
            raise OptimStateError(f"shard {i} is not an optimizer-state shard (format {FORMAT!r} expected, "
                                  f"got {s.get('format') if isinstance(s, dict) else type(s).__name__!r})")
    world = shards[0]["world_size"]
    ranks = sorted(s["rank"] for s in shards)
    if any(s["world_size"] != world for s in shards) or ranks != list(range(world)):
        missing = sorted(set(range(world)) - set(ranks))
        raise OptimStateError(f"the shards do not form one checkpoint: saved at world size {world}, got ranks "
                              f"{ranks}" + (f" (missing rank {missing})" if missing else ""))
    algos = {s["algorithm"] for s in shards}
    if len(algos) != 1:
        raise OptimStateError(f"shards were saved by different optimizers: {sorted(algos)}")


def _check_groups(saved: list[dict], mine: list[dict], saved_algo: str, my_algo: str) -> None:
    if saved_algo != my_algo:
        raise OptimStateError(f"the checkpoint holds {saved_algo} state; this optimizer is {my_algo}")
    if len(saved) != len(mine):
        raise OptimStateError(f"the checkpoint has {len(saved)} parameter groups, this optimizer {len(mine)}")
    have = {f for g in mine for f in g["params"]}
    got = {f for g in saved for f in g["params"]}
    if have - got:
        raise OptimStateError(f"parameter {sorted(have - got)[0]!r} is missing from the checkpoint "
                              f"(all missing: {sorted(have - got)})")
    if got - have:
        raise OptimStateError(f"the checkpoint has state for {sorted(got - have)[0]!r}, which this optimizer "
                              f"does not hold (all extra: {sorted(got - have)})")
    for i, (a, b) in enumerate(zip(saved, mine)):
        if set(a["params"]) != set(b["params"]):
            moved = sorted(set(a["params"]) ^ set(b["params"]))
            raise OptimStateError(f"parameter {moved[0]!r} is in a different parameter group (group {i}) "
                                  "in the checkpoint")
        ka, kb = set(a) - {"params"}, set(b) - {"params"}
        if ka != kb:
            raise OptimStateError(f"group {i}: hyperparameters differ (checkpoint only: {sorted(ka - kb)}, "
                                  f"optimizer only: {sorted(kb - ka)}); was it saved by another algorithm?")


@dataclass
class _Src:
    """One saved piece of one parameter: elements [start, end) with its state."""
    start: int
    end: int
    kinds: dict
    state: dict


def _index_sources(shards: Sequence[dict]) -> tuple[dict, dict]:
    meta: dict[str, dict] = {}
    pieces: dict[str, list[_Src]] = {}
    for s in shards:
        for fqn, m in s["params"].items():
            prev = meta.setdefault(fqn, m)
            if list(prev["shape"]) != list(m["shape"]) or prev["dtype"] != m["dtype"]:
                raise OptimStateError(f"{fqn!r}: shards disagree on its shape/dtype")
            if fqn in s["state"]:
                pieces.setdefault(fqn, []).append(_Src(m["start"], m["end"], s["kinds"][fqn], s["state"][fqn]))
    for fqn in pieces:
        pieces[fqn].sort(key=lambda x: x.start)
    return meta, pieces


def _same_value(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        from optparity.harness.bitwise import compare
        return compare(a, b) is None
    return type(a) is type(b) and a == b


def _plan(slots: list[_Slot], meta: dict, pieces: dict) -> dict:
    """Validate everything and return {param: (ordered keys, kinds, dtypes, scalars)} for the
    slots that get state. Raises before anything is touched."""
    plan = {}
    for slot in slots:
        for pc in slot.pieces:
            m = meta.get(pc.fqn)
            if m is None:
                raise OptimStateError(f"parameter {pc.fqn!r} is missing from the checkpoint")
            if list(m["shape"]) != list(pc.shape):
                raise OptimStateError(f"{pc.fqn!r}: shape {tuple(m['shape'])} in the checkpoint, "
                                      f"{tuple(pc.shape)} here")
            if m["dtype"] != str(pc.dtype):
                raise OptimStateError(f"{pc.fqn!r}: dtype {m['dtype']} in the checkpoint, {pc.dtype} here")
        with_state = [pc for pc in slot.pieces if pc.fqn in pieces]
        if not with_state:
            continue
        if len(with_state) != len(slot.pieces):
            have = [pc.fqn for pc in with_state]
            lack = [pc.fqn for pc in slot.pieces if pc.fqn not in pieces]
            raise OptimStateError(f"{lack[0]!r} has no state in the checkpoint but shares a flat parameter "
                                  f"with {have[0]!r}, which has")
        keys, kinds, dtypes, scalars = None, None, {}, {}
        for pc in with_state:
            srcs = pieces[pc.fqn]
            pos = pc.start
            for src in srcs:  # the saved ranges must tile what this rank needs
                if src.end <= pos or src.start >= pc.end:
                    continue
                if src.start > pos:
                    break
                pos = src.end
            if pos < pc.end:
                raise OptimStateError(f"{pc.fqn!r}: elements {pos}..{pc.end} have no state in the checkpoint "
                                      "(a shard is missing?)")
            for src in srcs:
                if keys is None:
                    keys, kinds, first = list(src.state), dict(src.kinds), pc.fqn
                if set(src.state) != set(keys) or src.kinds != {k: kinds[k] for k in src.kinds}:
                    raise OptimStateError(f"{pc.fqn!r}: state keys {sorted(src.state)} differ from "
                                          f"{sorted(keys)} of {first!r}")
                for k in keys:
                    v = src.state[k]
                    if kinds[k] == "elem":
                        if v.dim() != 1 or v.numel() != src.end - src.start:
                            raise OptimStateError(f"{pc.fqn!r}: state {k!r} has {v.numel()} elements for a "
                                                  f"range of {src.end - src.start}")
                        if dtypes.setdefault(k, v.dtype) != v.dtype:
                            raise OptimStateError(f"{pc.fqn!r}: state {k!r} is {v.dtype}, elsewhere {dtypes[k]}")
                    elif k in scalars and not _same_value(scalars[k], v):
                        raise OptimStateError(f"{pc.fqn!r}: state {k!r} = {v!r} differs from {scalars[k]!r} "
                                              "of a parameter it shares a flat parameter or shard with")
                    else:
                        scalars.setdefault(k, v)
        plan[slot.param] = (keys, kinds, dtypes, scalars)
    return plan


def _build(slot: _Slot, plan_entry, pieces: dict) -> dict:
    keys, kinds, dtypes, scalars = plan_entry
    device = _local(slot.param).device
    n = 1
    for s in slot.local_shape:
        n *= s
    out = {}
    for k in keys:
        if kinds[k] != "elem":
            v = scalars[k]
            out[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
            continue
        buf = torch.zeros(n, dtype=dtypes[k])  # FSDP's padding holds zeros, as upstream's loader writes
        for pc in slot.pieces:
            for src in pieces[pc.fqn]:
                lo, hi = max(pc.start, src.start), min(pc.end, src.end)
                if lo < hi:
                    buf[pc.offset + lo - pc.start:pc.offset + hi - pc.start].copy_(
                        src.state[k][lo - src.start:hi - src.start])
        t = buf.view(slot.local_shape).to(device)
        if slot.kind == "dtensor":
            from torch.distributed.tensor import DTensor
            t = DTensor.from_local(t, slot.param.device_mesh, slot.param.placements, run_check=False,
                                   shape=slot.param.shape, stride=slot.param.stride())
        out[k] = t
    return out


def _apply(optim, model, slots, by_param, plan, pieces, saved_groups) -> None:
    """Load the planned state into `optim` through its own load_state_dict."""
    ids = {}
    for group in optim.param_groups:
        for p in group["params"]:
            ids[p] = len(ids)
    state = {ids[s.param]: _build(s, plan[s.param], pieces) for s in slots if s.param in plan}
    groups = []
    for saved, group in zip(saved_groups, optim.param_groups):
        g = {k: copy.deepcopy(v) for k, v in saved.items() if k != "params"}
        g["params"] = [ids[p] for p in group["params"]]
        groups.append(g)
    _unnamed(optim).load_state_dict({"state": state, "param_groups": groups})
    _drop_unloaded_state(optim, plan)


def _drop_unloaded_state(optim, plan: dict) -> None:
    """torch.optim semantics for every target: after a load only the loaded parameters have state.
    Plain, FSDP and fully_shard targets get that from torch.optim's load_state_dict; torch's ZeRO
    only overwrites its local optimizer's entries, so a rollback in place would keep the newer
    state of a parameter the checkpoint has none for."""
    if not _is_zero(_unnamed(optim)):
        return
    state = _inner(optim).state
    for p in [p for p in state if p not in plan]:
        del state[p]


def load_optim_state_shards(optim, model: nn.Module, shards: Iterable) -> None:
    """Load a checkpoint written by save_optim_state_shard on N ranks into `optim` on this rank,
    whatever N and the world size now. `shards`: every rank's file (or dict), in any order;
    files are memory-mapped, and only the ranges this rank owns are read. As
    torch.optim.Optimizer.load_state_dict, the checkpoint replaces the whole state on every
    target (ZeRO included): a parameter it has no state for has none afterwards, also when
    `optim` has trained since (a rollback in place)."""
    shards = [_open(s) for s in shards]
    _check_shards(shards)
    slots, by_param = _all_slots(model, optim)
    mine = _groups_by_fqn(optim, by_param)
    _check_groups(shards[0]["param_groups"], mine, shards[0]["algorithm"], type(_inner(optim)).__name__)
    meta, pieces = _index_sources(shards)
    plan = _plan(slots, meta, pieces)
    _apply(optim, model, slots, by_param, plan, pieces, shards[0]["param_groups"])


def shards_to_full(shards: Iterable) -> dict[str, Any]:
    """Offline: merge every rank's shard into one FQN-keyed optimizer state dict (holds the full
    state, unlike load_optim_state_shards)."""
    shards = [_open(s) for s in shards]
    _check_shards(shards)
    meta, pieces = _index_sources(shards)
    state = {}
    for g in shards[0]["param_groups"]:
        for fqn in g["params"]:
            if fqn not in pieces:
                continue
            m = meta[fqn]
            numel = 1
            for s in m["shape"]:
                numel *= s
            src0 = pieces[fqn][0]
            entry = {}
            for k in src0.state:
                if src0.kinds[k] != "elem":
                    v = src0.state[k]
                    entry[k] = v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                    continue
                buf = torch.empty(numel, dtype=src0.state[k].dtype)
                covered = 0
                for src in pieces[fqn]:
                    buf[src.start:src.end].copy_(src.state[k])
                    covered += src.end - src.start
                if covered != numel:
                    raise OptimStateError(f"{fqn!r}: the shards hold {covered} of its {numel} elements")
                entry[k] = buf.view(m["shape"])
            state[fqn] = entry
    return {"state": state, "param_groups": copy.deepcopy(shards[0]["param_groups"])}


def _full_as_shard(full: dict, slots: list[_Slot], algo: str) -> dict:
    """View an FQN-keyed full dict as a one-rank shard (no copies)."""
    if not isinstance(full, dict) or "state" not in full or "param_groups" not in full:
        raise OptimStateError("an optimizer state dict needs 'state' and 'param_groups'")
    shape_of = {}
    for s in slots:
        for pc in s.pieces:
            shape_of[pc.fqn] = (pc.shape, pc.dtype, s)
        if s.kind == "whole" and not s.pieces:  # ZeRO: not owned here, still a known parameter
            shape_of[s.fqns[0]] = (s.param.shape, s.param.dtype, s)
    listed = [f for g in full["param_groups"] for f in g["params"]]
    for fqn in full["state"]:
        if fqn not in listed:
            raise OptimStateError(f"the state dict has state for {fqn!r}, which no parameter group lists")
    params, kinds, state = {}, {}, {}
    for fqn in listed:
        if fqn not in shape_of:
            continue  # reported as an extra parameter by _check_groups
        shape, dtype, slot = shape_of[fqn]
        numel = 1
        for d in shape:
            numel *= d
        params[fqn] = {"shape": list(shape), "dtype": str(dtype), "start": 0, "end": numel}
        st = full["state"].get(fqn)
        if not st:
            continue
        kinds[fqn], state[fqn] = {}, {}
        dt = next((v for v in st.values() if _is_dtensor(v) and v.dim() > 0), None)
        if dt is not None:  # a sharded (DTensor) dict: this rank's rows only
            start = _dtensor_start(dt, fqn)
            params[fqn].update(start=start, end=start + dt.to_local().numel())
        for k, v in st.items():
            if torch.is_tensor(v):
                if _is_dtensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(shape):
                    kinds[fqn][k], state[fqn][k] = "elem", v.to_local().reshape(-1)
                    continue
                v = _local(v)
                if v.dim() == 0 and not (len(shape) == 0 and k != "step"):
                    kinds[fqn][k], state[fqn][k] = "scalar", v
                    continue
                if tuple(v.shape) != tuple(shape):
                    raise OptimStateError(f"{fqn!r}: state {k!r} has shape {tuple(v.shape)}, the parameter "
                                          f"{tuple(shape)}")
                if v.is_floating_point() and v.dtype != dtype:
                    raise OptimStateError(f"{fqn!r}: state {k!r} is {v.dtype}, the parameter {dtype}")
                kinds[fqn][k], state[fqn][k] = "elem", v.reshape(-1)
            else:
                kinds[fqn][k], state[fqn][k] = "object", v
    return {"format": FORMAT, "algorithm": algo, "world_size": 1, "rank": 0,
            "param_groups": full["param_groups"], "params": params, "kinds": kinds, "state": state}


def _full_to_local(full: dict, model, optim, algo: str | None = None) -> None:
    slots, by_param = _all_slots(model, optim)
    my_algo = type(_inner(optim)).__name__
    shard = _full_as_shard(full, slots, algo or my_algo)
    mine = _groups_by_fqn(optim, by_param)
    _check_groups(shard["param_groups"], mine, shard["algorithm"], my_algo)
    meta, pieces = _index_sources([shard])
    plan = _plan(slots, meta, pieces)
    return slots, by_param, plan, pieces, shard["param_groups"]


def load_full_optim_state(optim, model: nn.Module, full: dict, algorithm: str | None = None) -> None:
    """Load an FQN-keyed full state dict (NamedOptimizer / DCP / FSDP full layout, or a
    ZeRO/plain dict rekeyed with to_fqn_keyed) into any supported optimizer: each rank keeps its
    part. `algorithm`, when given, is checked against this optimizer's class name."""
    _apply(optim, model, *_full_to_local(full, model, optim, algorithm))


# ---------------------------------------------------------------------------
# rekeying: param id <-> FQN
# ---------------------------------------------------------------------------

def _plain_param_to_fqn(model: nn.Module) -> dict:
    out = {}
    for p, fqns in _param_to_fqns(model).items():
        if len(fqns) != 1:
            raise OptimStateError(f"a parameter maps to {len(fqns)} names {fqns}; rekeying needs one each")
        out[p] = fqns[0]
    return out


def _optim_params(optim=None, optim_input=None) -> list:
    if optim is not None:
        return [p for g in optim.param_groups for p in g["params"]]
    if optim_input is None:
        raise OptimStateError("pass optim (or optim_input) to map parameter ids")
    items = list(optim_input)
    if items and isinstance(items[0], dict):
        return [p for g in items for p in g["params"]]
    return items


def rekey_optim_state_dict(optim_state_dict: dict, optim_state_key_type, model: nn.Module,
                           optim_input=None, optim=None) -> dict:
    """FSDP.rekey_optim_state_dict: state keyed by parameter id <-> by name (for a model whose
    optimizer holds its original parameters). As upstream: the input itself comes back when it
    already has the wanted key type, per-parameter state is shared, group params are sorted."""
    K = _key_type()
    if optim_state_key_type not in (K.PARAM_NAME, K.PARAM_ID):
        raise AssertionError(f"Expected optim_state_key_type to be PARAM_NAME or PARAM_ID, got {optim_state_key_type}")
    keys = list(optim_state_dict["state"])
    names = [type(k) is str for k in keys]
    ids = [type(k) is int for k in keys]
    if (any(names) and not all(names)) or (any(ids) and not all(ids)):
        raise ValueError(f"Invalid parameter keys: {optim_state_dict['state'].keys()}")
    if (optim_state_key_type == K.PARAM_NAME and all(names)) or (optim_state_key_type == K.PARAM_ID and all(ids)):
        return optim_state_dict
    params = _optim_params(optim, optim_input)
    to_name = _plain_param_to_fqn(model)
    if optim_state_key_type == K.PARAM_NAME:
        id_to_name = [to_name[p] for p in params]
        for k in keys:
            if not 0 <= k < len(id_to_name):
                raise OptimStateError(f"state for parameter id {k}, but the optimizer has {len(id_to_name)} parameters")
        remap = lambda k: id_to_name[k]  # noqa: E731
    else:
        pid = {p: i for i, p in enumerate(params)}
        name_to_id = {n: pid[p] for p, n in to_name.items() if p in pid}
        for k in keys:
            if k not in name_to_id:
                raise OptimStateError(f"state for {k!r}, which is not a parameter of this optimizer")
        remap = name_to_id.__getitem__
    groups = copy.deepcopy(optim_state_dict["param_groups"])
    for g in groups:
        g["params"] = sorted(remap(k) for k in g["params"])
    return {"state": {remap(k): v for k, v in optim_state_dict["state"].items()}, "param_groups": groups}


def to_fqn_keyed(optim_state_dict: dict, model: nn.Module, optim) -> dict:
    """A param-id keyed dict (torch.optim, ZeRO consolidated) -> FQN keyed, group order kept
    (the NamedOptimizer / distributed-checkpoint layout). Shares no tensor with the input."""
    params = _optim_params(optim)
    names = [_plain_param_to_fqn(model)[p] for p in params]
    out = copy.deepcopy(optim_state_dict)
    for k in out["state"]:
        if type(k) is not int or not 0 <= k < len(names):
            raise OptimStateError(f"state key {k!r} is not a parameter id of this optimizer (0..{len(names) - 1})")
    out["state"] = {names[k]: v for k, v in out["state"].items()}
    for g in out["param_groups"]:
        g["params"] = [names[k] for k in g["params"]]
    return out


def to_id_keyed(optim_state_dict: dict, model: nn.Module, optim) -> dict:
    """The inverse of to_fqn_keyed, for `optim`'s parameter order; takes NamedOptimizer's layout
    too (each group's FQNs sorted, "params" first). Each group's params come out in `optim`'s
    own order: torch.optim's load_state_dict pairs saved and current parameters by position, so
    a sorted list would hand one parameter's state to another. Group i of the dict must hold
    exactly the parameters of `optim`'s group i. Shares no tensor with the input."""
    sd = optim_state_dict
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise OptimStateError("an optimizer state dict needs 'state' and 'param_groups'")
    params = _optim_params(optim)
    to_name = _plain_param_to_fqn(model)
    ids = {to_name[p]: i for i, p in enumerate(params)}
    for k in [*sd["state"], *(f for g in sd["param_groups"] for f in g["params"])]:
        if k not in ids:
            raise OptimStateError(f"{k!r} is not a parameter of this optimizer")
    if len(sd["param_groups"]) != len(optim.param_groups):
        raise OptimStateError(f"the state dict has {len(sd['param_groups'])} parameter groups, this optimizer "
                              f"{len(optim.param_groups)}")
    mine = []
    for i, (saved, group) in enumerate(zip(sd["param_groups"], optim.param_groups)):
        own = [ids[to_name[p]] for p in group["params"]]
        got = [ids[f] for f in saved["params"]]
        if sorted(got) != sorted(own):
            odd = sorted(set(got) ^ set(own)) or [got[0]]
            raise OptimStateError(f"parameter {_name_of(ids, odd[0])!r} is in group {i} of only one of the state "
                                  "dict and the optimizer")
        mine.append(own)
    out = copy.deepcopy(sd)
    out["state"] = {ids[k]: v for k, v in out["state"].items()}
    for g, own in zip(out["param_groups"], mine):
        g["params"] = own
    return out


def _name_of(ids: dict, pid: int) -> str:
    return next(n for n, i in ids.items() if i == pid)


# ---------------------------------------------------------------------------
# FSDP (FullyShardedDataParallel): full optimizer state
# ---------------------------------------------------------------------------

def _flat_offsets(flat) -> list[int]:
    """Unsharded flat offset of each original parameter (alignment padding skipped)."""
    out, pos = [], 0
    numels = flat._numels_with_padding if flat._numels_with_padding is not None else flat._numels
    padding = flat._is_padding_mask if flat._is_padding_mask is not None else [False] * len(numels)
    for n, pad in zip(numels, padding):
        if not pad:
            out.append(pos)
        pos += n
    return out


def _fsdp_handles(model):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return [m._handle for m in FSDP.fsdp_modules(model) if m._handle is not None]


def _use_orig_params(model) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    mods = FSDP.fsdp_modules(model)
    if not mods:
        raise OptimStateError("the model has no FullyShardedDataParallel module")
    flags = {m._use_orig_params for m in mods}
    if len(flags) != 1:
        raise AssertionError("Not all FSDP modules have the same _use_orig_params value")
    return flags.pop()


def full_optim_state_dict(model: nn.Module, optim, rank0_only: bool = True, group=None,
                          cpu_offload: bool = True) -> dict[str, Any]:
    """FSDP.full_optim_state_dict: the FQN-keyed full state, gathered from every rank
    (collective). With rank0_only, ranks other than 0 get {}."""
    return _gathered_state(model, optim, rank0_only, group, cpu_offload, sharded=False)


def sharded_optim_state_dict(model: nn.Module, optim, group=None, cpu_offload: bool = False) -> dict[str, Any]:
    """FSDP.sharded_optim_state_dict: FQN keyed like the full dict, but each positive-dimension
    state tensor is a ShardedTensor holding this rank's dim-0 chunk (torch.chunk over the
    world size); 0-dim and non-tensor state whole. As upstream, the full state is gathered
    first (so each rank transiently holds it)."""
    return _gathered_state(model, optim, False, group, cpu_offload, sharded=True)


def _chunk_sharded(t: torch.Tensor, group) -> Any:
    """FSDP's ShardedTensor layout: dim-0 chunks, chunk r on rank r, no communication."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    chunks = t.chunk(world, dim=0)
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    ndev = torch.cuda.device_count() if device == "cuda" else 0
    tail = [0] * (t.dim() - 1)
    metas, start = [], 0
    for r, c in enumerate(chunks):
        g = dist.get_global_rank(group, r) if group is not None else r
        where = f"rank:{g}/cpu" if device == "cpu" else f"rank:{g}/cuda:{g % ndev}"
        metas.append(ShardMetadata([start, *tail], list(c.shape), where))
        start += c.shape[0]
    local = []
    if rank < len(chunks):
        step = -(-t.shape[0] // world)  # upstream's offset: ceil(rows / world) * rank
        local.append(Shard.from_tensor_and_offsets(chunks[rank].clone(), [step * rank, *tail], rank))
    props = TensorProperties(dtype=t.dtype, layout=t.layout, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=t.is_pinned())
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, sharded_tensor_metadata=ShardedTensorMetadata(metas, t.size(), props), process_group=group)


def _chunk_dtensor(t: torch.Tensor, mesh) -> Any:
    """FSDP's DTensor layout (_use_dtensor): Shard(0) over the mesh's last dimension, replicated
    over the others; each rank keeps its torch.chunk of the rows, no communication."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    replicated = [Replicate()] * mesh.ndim
    placements = [Replicate()] * (mesh.ndim - 1) + [Shard(0)]
    return DTensor.from_local(t.detach().clone(), mesh, replicated, run_check=False).redistribute(
        mesh, placements)


def _unshard(v: Any, fqn: str, key: str, group) -> Any:
    """A ShardedTensor of dim-0 chunks, or a DTensor -> the full tensor on every rank (collective)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    if _is_dtensor(v):
        return v.full_tensor()
    if not isinstance(v, ShardedTensor):
        return v
    md = v.metadata()
    shards = v.local_shards()
    if len(shards) > 1:
        raise OptimStateError(f"{fqn!r}: state {key!r} has {len(shards)} local shards; FSDP writes one per rank")
    row = 1
    for d in md.size[1:]:
        row *= d
    rows = max((m.shard_sizes[0] for m in md.shards_metadata), default=0)
    world = dist.get_world_size(group)
    buf = torch.zeros(rows * row, dtype=md.tensor_properties.dtype,
                      device=shards[0].tensor.device if shards else "cpu")
    if shards:
        local = shards[0].tensor.reshape(-1)
        buf[:local.numel()].copy_(local)
    outs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(outs, buf, group=group)
    full = torch.empty(md.size, dtype=buf.dtype, device=buf.device).reshape(-1)
    for m in md.shards_metadata:
        r = m.placement.rank()
        if group is not None:
            r = dist.get_group_rank(group, r)
        n = m.shard_sizes[0] * row
        full[m.shard_offsets[0] * row:m.shard_offsets[0] * row + n].copy_(outs[r][:n])
    return full.view(md.size)


def _all_gather_flat(buf: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's `buf`, concatenated in rank order, in one tensor (no per-rank copies)."""
    out = torch.empty(world * buf.numel(), dtype=buf.dtype, device=buf.device)
    try:
        dist.all_gather_into_tensor(out, buf, group=group)
    except (RuntimeError, NotImplementedError):  # a backend without the flat all-gather
        dist.all_gather(list(out.chunk(world)), buf, group=group)
    return out


def _gathered_state(model: nn.Module, optim, rank0_only: bool, group, cpu_offload: bool,
                    sharded: bool, mesh=None) -> dict[str, Any]:
    use_orig = _use_orig_params(model)
    keep = not rank0_only or dist.get_rank(group) == 0
    slots, by_param = _all_slots(model, optim)
    state = optim.state
    world = dist.get_world_size(group)
    # what every rank holds: per FQN, its keys in order with kind, dtype or value
    info = {}
    for slot in slots:
        st = state.get(slot.param) or {}
        if not st:
            continue
        for pc in slot.pieces:
            info[pc.fqn] = [(k, _value_kind(k, v, slot, pc.fqn),
                             v.dtype if _value_kind(k, v, slot, pc.fqn) == "elem" else
                             (v.detach().cpu() if torch.is_tensor(v) else v)) for k, v in st.items()]
    infos: list = [None] * world
    dist.all_gather_object(infos, info, group=group)
    merged: dict[str, list] = {}
    for r_info in infos:
        for fqn, entries in r_info.items():
            merged.setdefault(fqn, entries)
    # gather element-wise state one FlatParameter and key at a time
    full: dict[str, dict] = {}
    local_of = {}
    for slot in slots:
        for pc in slot.pieces:
            local_of[pc.fqn] = (slot, pc)
    to_fqns = _param_to_fqns(model)
    for handle in _fsdp_handles(model):
        flat = handle.flat_param
        if flat._params is not None:  # use_orig_params: the model names the original parameters
            fqns = [to_fqns[p][0] for p in flat._params]
        else:
            fqns = list(to_fqns[flat])
        offsets = _flat_offsets(flat)
        keys = []
        for fqn in fqns:
            for k, kind, meta in merged.get(fqn, []):
                if kind == "elem" and (k, meta) not in keys:
                    keys.append((k, meta))
        shard_numel = flat._sharded_size.numel() if hasattr(flat, "_sharded_size") else flat.numel()
        for k, dtype in keys:
            buf = torch.zeros(shard_numel, dtype=dtype, device=flat.device)
            for fqn in fqns:
                if fqn in local_of:
                    slot, pc = local_of[fqn]
                    st = state.get(slot.param) or {}
                    if k in st:
                        src = _local(st[k]).detach().reshape(-1)[pc.offset:pc.offset + pc.end - pc.start]
                        info_i = flat._shard_param_infos[fqns.index(fqn)]
                        buf[info_i.offset_in_shard:info_i.offset_in_shard + src.numel()].copy_(src)
            gathered = _all_gather_flat(buf, world, group)
            del buf
            if not keep:
                continue  # rank0_only: the others only send
            for i, fqn in enumerate(fqns):
                if fqn in merged and any(e[0] == k for e in merged[fqn]):
                    t = gathered[offsets[i]:offsets[i] + flat._numels[i]].view(flat._shapes[i])
                    t = t.cpu() if cpu_offload else t
                    # copies, so no entry pins the gathered buffer
                    full.setdefault(fqn, {})[k] = (t.clone() if not sharded else _chunk_dtensor(t, mesh)
                                                   if mesh is not None else _chunk_sharded(t, group))
            del gathered
    if not keep:
        return {}
    out_state = {}
    if use_orig:  # upstream: sorted FQNs, then grouped by FlatParameter (first appearance), others first
        flat_of = {to_fqns[p][0]: flat for p, (flat, _) in _orig_param_index(model).items()}
        groups_seen: dict = {}
        loose = [f for f in sorted(merged) if f not in flat_of]
        for f in sorted(merged):
            if f in flat_of:
                groups_seen.setdefault(id(flat_of[f]), []).append(f)
        order = loose + [f for fs in groups_seen.values() for f in fs]
    else:
        order = [f for s in slots for f in s.fqns if f in merged]
    for fqn in order:
        entries = merged[fqn]
        entry = {}
        # without use_orig_params upstream lists the element-wise state first, then the rest
        rank_of = {"elem": 0, "scalar": 1, "object": 2}
        keys = ([e[0] for e in sorted(entries, key=lambda e: rank_of[e[1]])] if not use_orig
                else [e[0] for e in entries])
        by_key = {e[0]: e for e in entries}
        for k in keys:
            _, kind, meta = by_key[k]
            if kind == "elem":
                entry[k] = full[fqn][k]
            elif kind == "scalar":
                entry[k] = meta.clone()
            else:
                entry[k] = copy.deepcopy(meta)
        out_state[fqn] = entry
    groups = []
    for g in optim.param_groups:
        gg = copy.deepcopy({k: v for k, v in g.items() if k != "params"})  # params last, as state_dict()
        gg["params"] = [f for p in g["params"] for f in by_param[p].fqns]
        groups.append(gg)
    return {"state": out_state, "param_groups": groups}


def _state_dict_config(model) -> tuple[bool, Any]:
    """(full?, the optimizer-state config) of the model's state_dict_type."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType
    # as upstream, this sets the sharded config's _use_dtensor when FSDP was given a device_mesh
    # (and refuses LOCAL_STATE_DICT then)
    settings = FSDP.get_state_dict_type(model)
    return settings.state_dict_type == StateDictType.FULL_STATE_DICT, settings.optim_state_dict_config


def _fsdp_mesh(model):
    """The device mesh FSDP was built with (None without one)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return getattr(FSDP.fsdp_modules(model)[0], "_device_mesh", None)


def optim_state_dict(model: nn.Module, optim, optim_state_dict: dict | None = None, group=None) -> dict:
    """FSDP.optim_state_dict: FULL_STATE_DICT gives the full dict (the config's rank0_only /
    offload_to_cpu), SHARDED_STATE_DICT and LOCAL_STATE_DICT the ShardedTensor dict."""
    full, cfg = _state_dict_config(model)
    if not full:
        mesh = _fsdp_mesh(model) if getattr(cfg, "_use_dtensor", False) else None
        if getattr(cfg, "_use_dtensor", False) and mesh is None:
            raise OptimStateError("_use_dtensor=True needs FSDP built with a device_mesh")
        return _gathered_state(model, optim, False, group, getattr(cfg, "offload_to_cpu", False), sharded=True,
                               mesh=mesh)
    return full_optim_state_dict(model, optim, rank0_only=getattr(cfg, "rank0_only", False), group=group,
                                 cpu_offload=getattr(cfg, "offload_to_cpu", True))


def _flattened_local(full: dict, model, optim, named: bool = False) -> dict:
    """The local optimizer's param-id keyed state dict for an FQN-keyed full dict."""
    return _local_dict(model, optim, *_full_to_local(full, model, optim), named=named,
                       saved=set(full["state"]) if named else ())


def _current_names(model) -> dict:
    """Optimizer parameter -> its name in model.named_parameters() (FSDP prefixes and all), the key
    upstream gives it for a NamedOptimizer: a FlatParameter under its own registered name, an
    original parameter (use_orig_params) under its FQN."""
    from torch.distributed.fsdp._common_utils import clean_tensor_name
    from torch.distributed.fsdp._flat_param import FlatParameter
    current, flat_clean = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        current[clean_tensor_name(name)] = name
        if isinstance(p, FlatParameter):
            flat_clean[p] = clean_tensor_name(name)
    out = {}
    for p, fqns in _param_to_fqns(model).items():
        clean = flat_clean[p] if p in flat_clean else fqns[0]
        if clean not in current:
            raise OptimStateError(f"{clean!r} is not a name in the model's named_parameters()")
        out[p] = current[clean]
    return out


def _local_dict(model, optim, slots, by_param, plan, pieces, groups, named: bool = False, saved=()) -> dict:
    """The dict for `optim`'s load_state_dict. named (upstream's is_named_optimizer): keyed by the
    parameters' names in model.named_parameters() instead of ids, each group's names sorted, and
    an original parameter (use_orig_params) with no elements on this rank keeps a copy of the
    state the optimizer holds for it, as upstream."""
    ids = {}
    for g in optim.param_groups:
        for p in g["params"]:
            ids[p] = len(ids)
    names = _current_names(model) if named else None
    inner_state = _inner(optim).state
    state = {}
    # upstream walks the model's parameters (module order), not the optimizer's: same here
    by_model_order = [by_param[p] for p in _param_to_fqns(model) if p in by_param]
    for s in by_model_order:
        key = names[s.param] if named else ids[s.param]
        if s.param in plan:
            built = _build(s, plan[s.param], pieces)
            if s.kind == "flat":  # upstream walks a set of the state names: same order here
                built = {k: built[k] for k in set(plan[s.param][0])}
            state[key] = built
        elif named and s.kind == "view1d" and not s.pieces and s.fqns[0] in saved \
                and inner_state.get(s.param) is not None:
            state[key] = copy.deepcopy(inner_state[s.param])
    out_groups = []
    for saved, g in zip(groups, optim.param_groups):
        # the saved group's keys in its own order, "params" replaced where it stands (as upstream)
        params = sorted({names[p] for p in g["params"]}) if named else [ids[p] for p in g["params"]]
        out_groups.append({k: (params if k == "params" else copy.deepcopy(v)) for k, v in saved.items()})
    return {"state": state, "param_groups": out_groups}


def optim_state_dict_to_load(model: nn.Module, optim, optim_state_dict: dict, is_named_optimizer: bool = False,
                             load_directly: bool = False, group=None) -> dict:
    """FSDP.optim_state_dict_to_load: the dict to give optim.load_state_dict (with load_directly
    it is loaded and None returned). FULL_STATE_DICT with rank0_only: only rank 0's dict is read
    (it is broadcast); SHARDED/LOCAL_STATE_DICT: a sharded_optim_state_dict is gathered."""
    full, cfg = _state_dict_config(model)
    named = is_named_optimizer
    if not full:
        out = _flatten_sharded(optim_state_dict, model, optim, group, named)
    elif getattr(cfg, "rank0_only", False):
        out = _scatter_full(optim_state_dict, model, optim, group, named)
    else:
        out = _flattened_local(optim_state_dict, model, optim, named)
    if load_directly:
        optim.load_state_dict(out)
        return None
    return out


def shard_full_optim_state_dict(full_optim_state_dict: dict, model: nn.Module, optim_input=None,
                                optim=None) -> dict:
    """FSDP.shard_full_optim_state_dict: this rank's param-id keyed part of a full dict."""
    if optim is None:
        raise OptimStateError("pass optim (optim_input is deprecated upstream and not supported here)")
    return _flattened_local(full_optim_state_dict, model, optim)


def flatten_sharded_optim_state_dict(sharded_optim_state_dict: dict, model: nn.Module, optim,
                                     group=None) -> dict:
    """FSDP.flatten_sharded_optim_state_dict: a sharded_optim_state_dict (any world size's
    ShardedTensors are gathered, collective) -> this rank's param-id keyed part. The input is
    not modified."""
    return _flatten_sharded(sharded_optim_state_dict, model, optim, group, False)


def _flatten_sharded(sd: dict, model, optim, group, named: bool) -> dict:
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise OptimStateError("an optimizer state dict needs 'state' and 'param_groups'")
    # every rank must take part in the same gathers: walk the FQNs in one order everywhere
    state = {}
    for fqn in sd["state"]:
        st = sd["state"][fqn]
        state[fqn] = {k: _unshard(v, fqn, k, group) for k, v in st.items()} if isinstance(st, dict) else st
    return _flattened_local({"state": state, "param_groups": sd["param_groups"]}, model, optim, named)


def scatter_full_optim_state_dict(full_optim_state_dict: dict | None, model: nn.Module, optim_input=None,
                                  optim=None, group=None) -> dict:
    """FSDP.scatter_full_optim_state_dict: rank 0 holds the full dict; every rank gets its part.

    Rank 0 broadcasts the dict with its positive-dimension tensors replaced by meta tensors;
    every rank validates that against its own parameters (all agree before any data moves, so
    bad input raises everywhere, naming the FQN); then each tensor is broadcast in turn and a
    rank keeps only the flat range it owns: one state tensor in flight at a time."""
    return _scatter_full(full_optim_state_dict, model, optim, group, False)


def _scatter_full(full_optim_state_dict, model, optim, group, named: bool) -> dict:
    me = dist.get_rank(group)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    real: list[torch.Tensor] = []

    def skeleton(st):
        if not isinstance(st, dict):
            return st
        out = {}
        for k, v in st.items():
            if torch.is_tensor(v) and not _is_dtensor(v) and v.dim() > 0:
                real.append(v)
                v = torch.empty(v.shape, dtype=v.dtype, device="meta")
            out[k] = v
        return out

    holder = [None]
    if me == 0:
        full = full_optim_state_dict
        if not isinstance(full, dict) or "state" not in full or "param_groups" not in full:
            holder = [OptimStateError("rank 0's optimizer state dict needs 'state' and 'param_groups'")]
        else:
            holder = [{"state": {f: skeleton(st) for f, st in full["state"].items()},
                       "param_groups": full["param_groups"]}]
    dist.broadcast_object_list(holder, src=src, group=group)
    if isinstance(holder[0], OptimStateError):
        raise holder[0]
    skel = holder[0]
    error = None
    try:
        prepared = _full_to_local(skel, model, optim)
    except OptimStateError as e:
        error = str(e)
    errors: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise OptimStateError(first if error is None else error)
    slots, by_param, plan, pieces, groups = prepared
    need = {}  # fqn -> the one flat range this rank holds
    for sl in slots:
        if sl.param in plan:
            for pc in sl.pieces:
                lo, hi = need.get(pc.fqn, (pc.start, pc.end))
                need[pc.fqn] = (min(lo, pc.start), max(hi, pc.end))
    device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    kept: dict = {}
    i = 0
    for fqn, st in skel["state"].items():
        for k, v in (st.items() if isinstance(st, dict) else ()):
            if not (torch.is_tensor(v) and v.is_meta):
                continue
            t = real[i].to(device) if me == 0 else torch.empty(v.shape, dtype=v.dtype, device=device)
            i += 1
            dist.broadcast(t, src=src, group=group)
            if fqn in need:
                lo, hi = need[fqn]
                kept[(fqn, k)] = t.reshape(-1)[lo:hi].to("cpu", copy=True)
            del t
    for fqn, (lo, hi) in need.items():
        srcs = pieces[fqn]
        st = {k: kept.get((fqn, k), v) for k, v in srcs[0].state.items()}
        pieces[fqn] = [_Src(lo, hi, srcs[0].kinds, st)]
    return _local_dict(model, optim, slots, by_param, plan, pieces, groups, named=named, saved=set(skel["state"]))


# ---------------------------------------------------------------------------
# fully_shard (DTensor state): torch.distributed.checkpoint.state_dict equivalents
# ---------------------------------------------------------------------------

def _init_state_if_empty(optim) -> None:
    """What upstream does before reading state: an optimizer with no state and no gradients
    takes one step with zero gradients and zero lr, so every parameter has state."""
    if optim.state:
        return
    if any(p.grad is not None for g in optim.param_groups for p in g["params"]):
        return
    for g in optim.param_groups:
        for p in g["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    saved = []
    for g in optim.param_groups:
        if "lr" in g:
            saved.append(g["lr"])
            g["lr"] = torch.tensor(0.0) if torch.is_tensor(g["lr"]) else 0.0
    optim.step()
    for g in optim.param_groups:
        if "lr" in g:
            g["lr"] = saved.pop(0)
    _unnamed(optim).zero_grad(set_to_none=True)  # (a NamedOptimizer's own zero_grad does not work)


def _options(options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return options or StateDictOptions()


def get_optimizer_state_dict(model: nn.Module, optimizers, *, submodules=None, options=None) -> dict:
    """torch.distributed.checkpoint.state_dict.get_optimizer_state_dict for fully_shard or plain
    models: FQN keyed; DTensor state as is, or gathered to full tensors (full_state_dict, with
    cpu_offload only rank 0 keeps them)."""
    opts = _options(options)
    if submodules is not None:
        raise NotImplementedError("submodules is deprecated upstream and not supported")
    if opts.flatten_optimizer_state_dict:
        raise NotImplementedError("flatten_optimizer_state_dict is not supported")
    optims = optimizers if isinstance(optimizers, (list, tuple)) else (optimizers,)
    out = {"state": {}, "param_groups": []}
    to_name = _plain_param_to_fqn(model)
    for optim in optims:
        _init_state_if_empty(optim)
        sd = optim.state_dict()
        params = _optim_params(optim)
        names = [to_name[p] for p in params]
        pid = {n: i for i, n in enumerate(names)}
        # param ids become FQNs; as upstream, FQN keys (a NamedOptimizer's state_dict) become
        # param ids: upstream maps both ways through one table
        rekey = lambda k: names[k] if type(k) is int else pid[k]  # noqa: E731
        for k, v in sd["state"].items():
            out["state"][rekey(k)] = v
        for g in sd["param_groups"]:
            g = dict(g)
            g["params"] = [rekey(i) for i in g["params"]]
            out["param_groups"].append(g)
    if not (opts.full_state_dict or opts.cpu_offload):
        return out
    rank0 = opts.full_state_dict and opts.cpu_offload
    keep = not rank0 or dist.get_rank() == 0

    def convert(v):
        if _is_dtensor(v):
            v = v.full_tensor() if opts.full_state_dict else v
        if torch.is_tensor(v) and opts.cpu_offload and not _is_dtensor(v):
            v = v.cpu()
        return v

    state = {}
    for fqn, st in out["state"].items():
        state[fqn] = {k: convert(v) for k, v in st.items()}
    if not keep:
        return {}
    return {"state": state, "param_groups": out["param_groups"]}


def _dcp_leaves(obj, path=()) -> list:
    """(path, leaf) pairs the way distributed checkpoint flattens a state dict: mappings (keys as
    str) and lists/tuples (indices) are walked, anything else is a leaf."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _dcp_leaves(v, path + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out += _dcp_leaves(v, path + (i,))
    else:
        out.append((path, obj))
    return out


def _dcp_rebuild(leaves: dict) -> dict:
    """The inverse of _dcp_leaves as upstream rebuilds: int path items make lists (so tuples come
    back as lists), str items dicts; empty containers are gone."""
    root: dict = {}
    for path, value in leaves.items():
        cur = root
        for here, nxt in zip(path, path[1:]):
            fresh = {} if type(nxt) is str else []
            if isinstance(cur, dict):
                cur = cur.setdefault(here, fresh)
            else:
                while len(cur) <= here:
                    cur.append(None)
                if cur[here] is None:
                    cur[here] = fresh
                cur = cur[here]
        last = path[-1]
        if isinstance(cur, list):
            while len(cur) <= last:
                cur.append(None)
        cur[last] = value
    return root


def _own(v):
    """A copy of a loaded leaf (upstream loads the caller's own step tensors, which the next step
    would then advance in the caller's dict); tensors on the CPU, as upstream moves them."""
    return v.detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)


def _split_for(optim, to_name: dict, sd: dict, strict: bool) -> dict:
    """The part of an FQN-keyed dict for `optim`, in its parameter order (upstream's
    _split_optim_state_dict): groups are {"params": [FQNs], then the saved group's settings},
    state only for parameters that require grad. Raises, naming the FQN, when `strict` and such
    a parameter has no state."""
    saved_state, saved_groups = sd["state"], sd["param_groups"]
    group_of = {}
    for i, g in enumerate(saved_groups):
        for f in g["params"]:
            group_of.setdefault(f, i)
    state, groups, match = {}, [], {}
    for j, group in enumerate(optim.param_groups):
        groups.append({"params": []})
        for p in group["params"]:
            fqn = to_name[p]
            groups[-1]["params"].append(fqn)
            if p.requires_grad:
                if fqn in saved_state:
                    state[fqn] = saved_state[fqn]
                elif strict:
                    raise OptimStateError(f"{fqn!r} requires grad but has no optimizer state in the checkpoint "
                                          "(StateDictOptions(strict=False) loads it anyway, as upstream)")
            if fqn in group_of:
                match[group_of[fqn]] = j
    for i, g in enumerate(saved_groups):
        if i in match:
            groups[match[i]].update({k: v for k, v in g.items() if k != "params"})
    return {"state": state, "param_groups": groups}


def set_optimizer_state_dict(model: nn.Module, optimizers, optim_state_dict: dict, *, options=None) -> None:
    """torch.distributed.checkpoint.state_dict.set_optimizer_state_dict for one optimizer over a
    fully_shard or plain model: an FQN-keyed dict with full tensors (full_state_dict: each rank
    takes its part) or DTensor state. The optimizer ends up as upstream's, structure included:
    state for parameters the checkpoint lacks is kept under full_state_dict (upstream merges into
    the current state) and dropped otherwise; with full_state_dict the groups' tuples (betas)
    become lists and the groups keep the optimizer's key order, otherwise "params" comes first.
    Bad input raises OptimStateError naming the FQN before anything changes."""
    opts = _options(options)
    optims = optimizers if isinstance(optimizers, (list, tuple)) else (optimizers,)
    if len(optims) != 1:
        raise NotImplementedError("one optimizer at a time")
    optim = optims[0]
    if opts.full_state_dict and opts.broadcast_from_rank0:
        holder = [optim_state_dict if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        optim_state_dict = holder[0]
    sd = optim_state_dict
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise OptimStateError("an optimizer state dict needs 'state' and 'param_groups'")
    if sd["state"] and all(type(k) is int for k in sd["state"]):
        raise OptimStateError("the state dict is keyed by parameter id; set_optimizer_state_dict takes FQN keys "
                              "(rekey it with to_fqn_keyed)")
    to_name = _plain_param_to_fqn(model)
    split = _split_for(optim, to_name, sd, opts.strict) if sd["state"] else sd
    # validate everything (shapes, dtypes, groups, algorithm) before anything changes
    slots, by_param, plan, pieces, _ = _full_to_local(split, model, optim)
    _init_state_if_empty(optim)  # as upstream, before loading
    built = {}
    for slot in slots:
        if slot.param in plan:
            built[slot.fqns[0]] = _build(slot, plan[slot.param], pieces)
    target = _unnamed(optim)
    if not opts.full_state_dict:
        # upstream loads its split dict as it is: state in parameter order, "params" first
        state = {f: built[f] for f in split["state"] if f in built}
        target.load_state_dict({"state": state, "param_groups": copy.deepcopy(split["param_groups"])})
        return
    # full_state_dict: upstream flattens the optimizer's current (FQN-keyed, local) dict and the
    # split dict, overwrites the current leaves with the loaded ones and rebuilds
    current = target.state_dict()
    names = [to_name[p] for p in _optim_params(optim)]
    local = {"state": {names[k]: v for k, v in current["state"].items()},
             "param_groups": [{**{k: v for k, v in g.items() if k != "params"},
                               "params": [names[i] for i in g["params"]]} for g in current["param_groups"]]}
    merged = dict(_dcp_leaves(local))
    loaded = _dcp_leaves(split)
    for path, v in loaded:
        if path[0] == "state" and len(path) == 3 and torch.is_tensor(v) and v.dim() > 0:
            if path in merged:  # this rank's part, as the optimizer holds it
                merged[path] = built[path[1]][path[2]]
            continue
        merged[path] = _own(v)
    for path, v in loaded:  # leaves the optimizer lacks
        if path in merged:
            continue
        if path[0] == "state" and len(path) == 3 and path[1] in built and torch.is_tensor(v) and v.dim() > 0:
            # upstream puts the whole tensor here, and a DTensor parameter's next step then fails
            # (mixed Tensor and DTensor); ours is this rank's part, as for every other state tensor
            merged[path] = built[path[1]][path[2]]
        else:
            merged[path] = v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)
    new = _dcp_rebuild(merged)
    new.setdefault("state", {})
    for g in new.get("param_groups", []):
        g.setdefault("params", [])
    ids = {n: i for i, n in enumerate(names)}
    new["state"] = {ids[f]: st for f, st in new["state"].items()}
    for g in new["param_groups"]:
        g["params"] = [ids[f] for f in g["params"]]
    target.load_state_dict(new)
