"""Kinds `fsdp` and `fsdp1`: is a torch.optim-style optimizer shard-safe?

The candidate, `Name(params_or_groups, **hyper)`, steps parameters sharded by FSDP:
  fsdp   FSDP2's `fully_shard`: every parameter a DTensor sharded on dim 0 (Shard(0)); the
         optimizer sees DTensors, and reductions over a tensor (norms, row/column statistics,
         Newton-Schulz) go through DTensor's collectives or fail there;
  fsdp1  FSDP1 with `use_orig_params=True`: every parameter a 1-D view of the part of its
         flattened elements this rank holds (empty on some ranks); a reduction over it sees that
         part only.
Every rank gets its part of the same global (averaged) gradient. The reference is the same
algorithm unsharded in one process on those gradients: torch.optim's class, or `--reference`'s
class. An optimizer that is element-wise matches it bit for bit; one that reduces across a tensor
must gather correctly or it shows, named by rank, step and parameter.

Where torch itself is not invariant under sharding (the `fused` path: its CPU kernels round a
tensor's tail differently, so a shard boundary moves the rounding, and they mishandle the gapped
view the unsharded set holds, docs/upstream-findings.md), the reference is that class on the same
sharding, bit for bit; docs/distributed-check.md ("FSDP kinds") has the measured distance of
torch's classes to the unsharded run.

FSDP refuses 0-dim parameters; the harness keeps them outside FSDP (a replicated DTensor under
fsdp, a plain tensor under fsdp1), as a model with such a parameter would have to. Parameters
are contiguous copies (FSDP2 refuses non-contiguous ones); the unsharded reference keeps the
parameter set's views. Closure-only optimizers (LBFGS) are not run: the matrix leaves them out;
sparse gradients (SparseAdam) are not applicable: FSDP's gradients are dense.
"""
from __future__ import annotations

import copy
import inspect
import os
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optparity.harness.candidates import NotApplicable, algorithm_of, options_not_accepted
from optparity.harness.distributed.base import Driver, OptimizerSide, RankContext

FLAVOURS = {"fsdp": "fsdp2", "fsdp1": "fsdp1"}
# The fused path's reference: "sharded" (the check: torch's class on the same sharding, bit for
# bit); "unsharded" / "unsharded-forloop" measure how far sharding moves torch's own fused rounding
# (scripts/fsdp_findings.py sets it; the ranks inherit the environment)
FUSED_REFERENCE_ENV = "OPTPARITY_FSDP_FUSED_REFERENCE"
_MESHES: dict[tuple, object] = {}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _mesh(ranks: tuple):
    """One DeviceMesh per set of ranks, kept for the life of the rank (building one is a rendezvous)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = (ranks, id(dist.distributed_c10d._get_default_group()))
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh("cpu", list(ranks))
    return _MESHES[key]


def _contiguous_parameter(p: Tensor) -> nn.Parameter:
    data = torch.empty(p.shape, dtype=p.dtype, device=p.device).copy_(p.detach())
    return nn.Parameter(data, requires_grad=p.requires_grad)


def shard(params: list[Tensor], flavour: str, group, ranks: tuple) -> tuple[nn.Module, list[Tensor]]:
    """A module holding a contiguous copy of each parameter, sharded by `flavour`; the sharded
    parameters in the order given. 0-dim ones (FSDP refuses them) stay whole outside FSDP."""
    holder, outside = nn.Module(), nn.Module()
    for i, p in enumerate(params):
        (outside if p.dim() == 0 else holder).register_parameter(f"p{i}", _contiguous_parameter(p))
    sharded_any = any(True for _ in holder.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1's deprecation and world-size-1 notices
        if flavour == "fsdp2":
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import Replicate, distribute_tensor

            mesh = _mesh(ranks)
            if sharded_any:
                fully_shard(holder, mesh=mesh)
            for name, p in list(outside.named_parameters()):
                outside.register_parameter(name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]),
                                                              requires_grad=p.requires_grad))
        elif sharded_any:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            holder = FSDP(holder, use_orig_params=True, device_id=torch.device("cpu"), process_group=group)
    module = nn.Module()
    module.holder, module.outside = holder, outside
    by_name = {n.rsplit(".", 1)[-1]: p for n, p in module.named_parameters()}
    return module, [by_name[f"p{i}"] for i in range(len(params))]


def _fsdp1_range(module: nn.Module, p: Tensor) -> tuple[int, int] | None:
    """fsdp1: the flat range [start, end) of the full parameter this rank's view holds ((0, 0):
    none); None for a parameter outside FSDP."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for m in FSDP.fsdp_modules(module):
        flat = m._handle.flat_param if m._handle is not None else None
        if flat is None or flat._params is None:
            continue
        for q, info in zip(flat._params, flat._shard_param_infos):
            if q is p:
                if info.in_shard and info.numel_in_shard:
                    return info.intra_param_start_idx, info.intra_param_end_idx + 1
                return 0, 0
    return None


class FsdpSide:
    """An optimizer class over FSDP-sharded copies of the parameters, on one rank."""

    def __init__(self, cls, params: list[Tensor], groups: list[dict], hyper: dict, flavour: str, ctx: RankContext):
        self.flavour, self.group = flavour, ctx.group
        self.full_shapes = [p.shape for p in params]
        self.module, self.params = shard(params, flavour, ctx.group, tuple(ctx.group_ranks))
        index = {id(p): i for i, p in enumerate(params)}
        sharded_groups = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [self.params[index[id(p)]] for p in g["params"]]} for g in groups]
        self.ranges = [_fsdp1_range(self.module, p) if flavour == "fsdp1" else None for p in self.params]
        self.opt = cls(sharded_groups, **hyper)
        self.scheduler = None

    # -- feeding ---------------------------------------------------------------------------------
    def set_gradients(self, grads: list[Tensor | None]) -> None:
        if any(g is not None and g.is_sparse for g in grads):
            raise NotApplicable("FSDP reduce-scatters dense gradients: there is no sparse gradient on FSDP shards",
                                ("sparse gradients",))
        for i, (p, g) in enumerate(zip(self.params, grads)):
            p.grad = None if g is None or not p.requires_grad else self._local(p, g, self.ranges[i])

    def _local(self, p: Tensor, g: Tensor, flat_range) -> Tensor | None:
        """This rank's part of the global gradient `g`, as FSDP would leave it in p.grad."""
        if self.flavour == "fsdp2":
            from torch.distributed.tensor import DTensor, Replicate
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            if all(isinstance(pl, Replicate) for pl in p.placements):
                return DTensor.from_local(g.clone(), p.device_mesh, p.placements, run_check=False)
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            local = g[offset[0]:offset[0] + shape[0]].contiguous().clone()
            return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        if flat_range is None:
            return g.clone()
        start, end = flat_range
        if end <= start:
            return None  # FSDP1 gives a parameter outside this rank's shard no gradient
        return g.reshape(-1)[start:end].clone().view(p.shape)

    def step(self):
        return self.opt.step()

    # -- reading ---------------------------------------------------------------------------------
    def full_params(self) -> list[Tensor]:
        if self.flavour == "fsdp2":
            return [p.detach().full_tensor() if _is_dtensor(p) else p.detach().clone() for p in self.params]
        mine = [p.detach().cpu().reshape(-1).clone() for p in self.params]
        every = self._all_gather(mine)
        return [self._joined(i, [(r[i], ev[i]) for r, ev in every]) for i in range(len(self.params))]

    def _all_gather(self, mine) -> list[tuple]:
        every = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(every, (self.ranges, mine), group=self.group)
        return every

    def _joined(self, i: int, parts) -> Tensor:
        """fsdp1: a full tensor from every rank's (range, flat part); parameters outside FSDP as is."""
        if self.ranges[i] is None:
            return parts[0][1].view(self.full_shapes[i])
        out = torch.zeros(self.full_shapes[i].numel(), dtype=parts[0][1].dtype)
        for (start, end), t in parts:
            if end > start:
                out[start:end] = t.reshape(-1)
        return out.view(self.full_shapes[i])

    def full_state_dict(self) -> dict:
        """torch.optim layout with every state tensor in full. fsdp: DTensor state gathered;
        fsdp1: one all_gather of every rank's state; tensors shaped like the rank's view are
        joined by range, anything else is taken from a rank holding part of the parameter."""
        sd = self.opt.state_dict()
        if self.flavour == "fsdp2":
            state = {i: {k: (v.full_tensor() if _is_dtensor(v) else v.detach().clone() if torch.is_tensor(v) else v)
                         for k, v in st.items()} for i, st in sd["state"].items()}
            return {"state": state, "param_groups": sd["param_groups"]}
        shapes = [tuple(p.shape) for p in self.params]
        mine = {i: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in st.items()}
                for i, st in sd["state"].items()}
        every = self._all_gather((shapes, mine))
        state = {}
        for i in sorted({i for _, (_, m) in every for i in m}):
            out, parts = {}, {}
            for ranges, (their_shapes, m) in every:
                if i not in m:
                    continue
                holds = ranges[i] is not None and ranges[i][1] > ranges[i][0]
                for k, v in m[i].items():
                    if ranges[i] is not None and torch.is_tensor(v) and v.dim() == 1 and tuple(v.shape) == their_shapes[i]:
                        parts.setdefault(k, []).append((ranges[i], v))
                    elif k not in out or holds:
                        out[k] = v
            for k, got in parts.items():
                out[k] = self._joined(i, got)
            state[i] = {k: out[k] for k in sd["state"].get(i, out)} if i in sd["state"] else out
        return {"state": dict(sorted(state.items())), "param_groups": sd["param_groups"]}

    def scale_lr(self, factor: float) -> None:
        OptimizerSide.scale_lr(self, factor)


class FsdpDriver(Driver):
    """fsdp: FSDP2 (fully_shard) DTensor parameters."""

    kind = "fsdp"
    flavour = "fsdp2"
    conditions = ("steps", "groups", "few_params", "lr_change")
    takes_reference = True

    def detect(self, obj):
        # a plain optimizer class: fsdp and fsdp1 both claim it, so the user is asked which
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and not _wrapper_keyword(obj):
            return f"a torch.optim.Optimizer subclass, run on {'FSDP2' if self.flavour == 'fsdp2' else 'FSDP1'} shards"
        return None

    def validate(self, obj):
        super().validate(obj)
        keyword = _wrapper_keyword(obj)
        if keyword:
            raise ValueError(f"{obj.__qualname__} takes {keyword}=: it wraps another optimizer (--kind zero); "
                             f"--kind {self.kind} checks an optimizer class run on FSDP-sharded parameters")
        if not callable(getattr(obj, "step", None)):
            raise ValueError(f"{obj.__qualname__} has no step() method: --kind {self.kind} needs a torch.optim-style class")

    def reference_label(self, obj, algorithm):
        return (f"torch.optim:{algorithm} unsharded in one process on the same global gradients "
                f"(the fused path: the same class on the same sharding)")

    def algorithms(self, obj, requested, level):
        if requested is not None:
            return [requested]
        own = algorithm_of(obj)
        if own is None:
            from optparity.harness.check import UsageError  # (raised here, outside validate: exit 2 all the same)

            raise UsageError(f"cannot tell which algorithm {obj.__qualname__} implements (its configurations and "
                             "parameter sets come from one): pass --algorithm")
        return [own]

    def build(self, ctx, obj, params, groups, algorithm, hyper):
        lacking = options_not_accepted(obj, "optimizer", hyper)
        if lacking:
            raise NotApplicable(f"{obj.__qualname__} takes no {', '.join(lacking)}", lacking)
        return FsdpSide(obj, params, groups, copy.deepcopy(hyper), self.flavour, ctx)

    def build_reference(self, ctx, params, groups, algorithm, hyper):
        from optparity.harness.algorithms import torch_class

        hyper = copy.deepcopy(hyper)  # a tensor lr must not be shared with the candidate (schedulers write it)
        cls = ctx.reference or torch_class(algorithm)
        if ctx.case.path == "fused":
            against = os.environ.get(FUSED_REFERENCE_ENV, "sharded")
            if against not in ("sharded", "unsharded", "unsharded-forloop"):
                raise ValueError(f"{FUSED_REFERENCE_ENV}={against!r}: sharded, unsharded or unsharded-forloop")
            if against == "sharded":
                return FsdpSide(cls, params, groups, hyper, self.flavour, ctx)
            if against == "unsharded-forloop":
                hyper = {k: v for k, v in hyper.items() if k != "fused"}  # the CPU's default: for-loop
        return OptimizerSide(cls(groups, **hyper))


class Fsdp1Driver(FsdpDriver):
    """fsdp1: FSDP1 use_orig_params=True (1-D views of this rank's part of each parameter)."""

    kind = "fsdp1"
    flavour = "fsdp1"


def _wrapper_keyword(obj) -> str | None:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    return next((k for k in ("optimizer_class", "optim") if k in params), None)


DRIVERS = (FsdpDriver(), Fsdp1Driver())
