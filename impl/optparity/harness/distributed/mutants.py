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
