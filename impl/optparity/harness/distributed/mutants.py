"""Planted distributed bugs: subclasses of torch's own distributed optimizers, each carrying one bug
such code really has. They live at the top level of this module so the ranks can import them by
name (optparity.harness.distributed.mutants:Name). DIST_MUTANTS is their catalogue:
`exposed(case)` says which cases carry the mutant's condition (it must be caught there, and only
there: tests/test_distributed_check.py runs it over the other cases and expects a pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer


def _grads(opt):
    return [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]


# --- zero ----------------------------------------------------------------------------------------

class ZeroAveragesTwice(ZeroRedundancyOptimizer):
    """All-reduces and averages the gradients DDP already averaged. Not in the catalogue: the ranks
    hold identical gradients, and (x + x) / 2 and (x + x + x) / 3 are exactly x in IEEE arithmetic,
    so this changes no bit at world sizes 2 and 3 (the check says so; measured). The numeric form
    of the bug is ZeroDividesByWorldSize."""

    def step(self, closure=None, **kwargs):
        for g in _grads(self):
            dist.all_reduce(g, group=self.process_group)
            g.div_(self.world_size)
        return super().step(closure, **kwargs)


class ZeroDividesByWorldSize(ZeroRedundancyOptimizer):
    """Takes the averaged gradients for summed ones and divides them by the world size again."""

    def step(self, closure=None, **kwargs):
        for g in _grads(self):
            g.div_(self.world_size)
        return super().step(closure, **kwargs)


@dataclass(frozen=True)
class DistMutant:
    name: str
    kind: str
    candidate: str  # "module:Name" the ranks import
    shows_under: str
    exposed: Callable[[object], bool]  # does this case carry the condition?
    algorithm: str = "Adam"


_HERE = __name__

DIST_MUTANTS: tuple[DistMutant, ...] = (
    DistMutant("zero_grads_averaged_twice", "zero", f"{_HERE}:ZeroDividesByWorldSize",
               "world size 2 or more (averaged gradients divided by the world size again)",
               lambda c: c.world_size >= 2),
)


def by_name(name: str) -> DistMutant:
    for m in DIST_MUTANTS:
        if m.name == name:
            return m
    raise KeyError(f"no distributed mutant named {name!r}; known: {', '.join(m.name for m in DIST_MUTANTS)}")


# --- fsdp ----------------------------------------------------------------------------------------

class AdafactorOnLocalShard(torch.optim.Adafactor):
    """Adafactor run on each rank's local shard of FSDP2's DTensor parameters as plain tensors (a
    common way to make an optimizer "work" on DTensors): RMS(param) and the column statistics (a
    mean over rows) see only this rank's rows, a norm over the local shard. Exactly torch's
    Adafactor on one rank; kind fsdp catches it from world size 2."""

    def _local_twin(self):
        if getattr(self, "_twin", None) is None:
            self._locals = {p: _local_of(p) for g in self.param_groups for p in g["params"]}
            self._twin = torch.optim.Adafactor([{**g, "params": [self._locals[p] for p in g["params"]]}
                                                for g in self.param_groups])
        for mine, theirs in zip(self.param_groups, self._twin.param_groups):  # lr changes reach the twin
            theirs.update({k: v for k, v in mine.items() if k != "params"})
        return self._twin

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        twin = self._local_twin()
        for p, local in self._locals.items():
            local.grad = None if p.grad is None else _local_of(p.grad)
        twin.step()
        for p, local in self._locals.items():  # the state as torch's class keeps it: DTensors
            if local in twin.state:
                self.state[p] = {k: _as_dtensor_like(v, p) for k, v in twin.state[local].items()}
        return loss


def _local_of(t):
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _as_dtensor_like(v, p):
    """A state tensor of the local twin as a DTensor over p's mesh: sharded by rows like p where it
    has p's rows, replicated otherwise (a column statistic: each rank's own, the bug)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(p, DTensor) or not torch.is_tensor(v) or v.dim() == 0:
        return v
    if v.shape[0] == p.to_local().shape[0] and v.dim() == p.dim() and not all(isinstance(x, Replicate) for x in p.placements):
        shape = (p.shape[0], *v.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)
    return DTensor.from_local(v, p.device_mesh, [Replicate()] * len(p.placements), run_check=False)


DIST_MUTANTS += (
    DistMutant("fsdp_norm_over_local_shard", "fsdp", f"{_HERE}:AdafactorOnLocalShard",
               "world size 2 or more (RMS and column statistics of the local shard only)",
               lambda c: c.world_size >= 2, algorithm="Adafactor"),
)
