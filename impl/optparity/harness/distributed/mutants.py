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


class ZeroLastShardNotBroadcast(ZeroRedundancyOptimizer):
    """Syncs every rank's shard but the last rank's: the others keep stale copies of its parameters."""

    def _sync_params(self):
        handles = []
        for rank in range(self.world_size - 1):
            handles.extend(self._broadcast_params_from_rank(rank))
        for h in handles:
            h.wait()


class ZeroGroupsNotSynced(ZeroRedundancyOptimizer):
    """step() no longer copies the exposed param_groups' settings into the local optimizer: a
    scheduler's new lr never reaches it."""

    def step(self, closure=None, **kwargs):
        self._sync_param_groups = lambda src, dst: None  # shadows the static method for this step
        try:
            return super().step(closure, **kwargs)
        finally:
            del self._sync_param_groups


class ZeroConsolidationLosesState(ZeroRedundancyOptimizer):
    """consolidate_state_dict keeps only the recipient's own shard of the state."""

    def consolidate_state_dict(self, to: int = 0):
        super().consolidate_state_dict(to)
        if self.rank == to:
            self._all_state_dicts = [sd if r == to else {**sd, "state": {}}
                                     for r, sd in enumerate(self._all_state_dicts)]


class ZeroLoadAssumesSavedWorldSize(ZeroRedundancyOptimizer):
    """Each rank loads only the state of the parameters it owned when the state was saved (as if
    restoring its own shard; a rank that was not there restores nothing): right at that world
    size, state lost at another."""

    def consolidate_state_dict(self, to: int = 0):
        for p in self._all_params:
            p._saved_at_world_size = self.world_size  # what this rank's "shard file" would record
        super().consolidate_state_dict(to)

    def load_state_dict(self, state_dict):
        tagged = {getattr(p, "_saved_at_world_size", None) for p in self._all_params}
        saved_ws = next(iter(tagged)) if len(tagged) == 1 else None
        saved = self._owners(saved_ws) if saved_ws else {}
        now = self._owners(self.world_size)
        state = {i: v for i, v in state_dict["state"].items() if saved.get(i) == now.get(i) == self.rank}
        for i, v in state_dict["state"].items():
            if now.get(i) != self.rank:
                state[i] = v  # not this rank's: torch's load ignores it either way
        super().load_state_dict({**state_dict, "state": state})

    def _owners(self, world_size: int) -> dict:
        """Parameter index -> owning rank under torch's partition at `world_size`."""
        actual = self.world_size
        self.world_size = world_size
        self._clear_cache()
        try:
            parts = self._partition_parameters()
            return {self._param_to_index[p]: r for r, groups in enumerate(parts) for g in groups for p in g["params"]}
        finally:
            self.world_size = actual
            self._clear_cache()


# --- adapter -------------------------------------------------------------------------------------

from optparity.harness.distributed.adapter_example import ZeroAdapter  # noqa: E402


class AdapterLrOnInnerOptimizer(ZeroAdapter):
    """The adapter protocol's example given the scale_lr its users write first: the lr is changed on
    the inner per-rank optimizer, and ZeroRedundancyOptimizer.step() copies the exposed param
    groups' (unchanged) lr over it, so the change is lost."""

    def scale_lr(self, factor):
        for group in self.opt.optim.param_groups:
            group["lr"] = group["lr"] * factor


# --- local-sgd -----------------------------------------------------------------------------------

from torch.distributed.algorithms.model_averaging import utils as _averaging_utils  # noqa: E402
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager  # noqa: E402


class AveragerPeriodOffByOne(PeriodicModelAverager):
    """Averages one step early in every period: (step - warmup + 1) % period == 0."""

    def average_parameters(self, params):
        if self.step >= self.warmup_steps and (self.step - self.warmup_steps + 1) % self.period == 0:
            _averaging_utils.average_parameters_or_parameter_groups(params, self.process_group)
        self.step += 1


class AveragerDuringWarmup(PeriodicModelAverager):
    """Averages at every warm-up step too."""

    def average_parameters(self, params):
        if self.step < self.warmup_steps or (self.step - self.warmup_steps) % self.period == 0:
            _averaging_utils.average_parameters_or_parameter_groups(params, self.process_group)
        self.step += 1


class AveragerSums(PeriodicModelAverager):
    """All-reduces the parameters and forgets to divide by the world size."""

    def average_parameters(self, params):
        if self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0:
            group = self.process_group
            for p in _flat_params(params):
                dist.all_reduce(p.data, group=group)
        self.step += 1


def _flat_params(params):
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item


@dataclass(frozen=True)
class DistMutant:
    name: str
    kind: str
    candidate: str  # "module:Name" the ranks import
    shows_under: str
    exposed: Callable[[object], bool]  # does this case carry the condition?
    algorithm: str = "Adam"


_HERE = __name__


def _periodic(case) -> bool:
    """A PeriodicModelAverager case (a hierarchical one is not applicable to a periodic averager)
    over 2 or more ranks (averaging one rank's parameters leaves them as they are)."""
    return not case.variant.get("hierarchical") and case.world_size >= 2

DIST_MUTANTS: tuple[DistMutant, ...] = (
    DistMutant("zero_grads_averaged_twice", "zero", f"{_HERE}:ZeroDividesByWorldSize",
               "world size 2 or more (averaged gradients divided by the world size again)",
               lambda c: c.world_size >= 2),
    DistMutant("zero_shard_not_broadcast", "zero", f"{_HERE}:ZeroLastShardNotBroadcast",
               "world size 2 or more (the last rank's shard; few_params leaves it empty)",
               lambda c: c.world_size >= 2 and c.condition != "few_params"),
    DistMutant("zero_groups_not_synced", "zero", f"{_HERE}:ZeroGroupsNotSynced",
               "param groups changed mid-run (an lr change; a group added, whose settings then never reach "
               "the exposed groups)", lambda c: c.condition in ("lr_change", "add_param_group")),
    DistMutant("zero_consolidation_loses_state", "zero", f"{_HERE}:ZeroConsolidationLosesState",
               "world size 2 or more (another rank's shard of the state)", lambda c: c.world_size >= 2),
    DistMutant("zero_load_at_other_world_size", "zero", f"{_HERE}:ZeroLoadAssumesSavedWorldSize",
               "a state_dict loaded at another world size", lambda c: c.condition in ("reload_down", "reload_up")),
    DistMutant("adapter_lr_on_inner_optimizer", "adapter", f"{_HERE}:AdapterLrOnInnerOptimizer",
               "an lr change mid-run", lambda c: c.condition == "lr_change"),
    DistMutant("local_sgd_period_off_by_one", "local-sgd", f"{_HERE}:AveragerPeriodOffByOne",
               "an averaging period of 2 or more, world size 2 or more", lambda c: _periodic(c) and c.variant.get("period", 1) >= 2, algorithm="SGD"),
    DistMutant("local_sgd_averages_in_warmup", "local-sgd", f"{_HERE}:AveragerDuringWarmup",
               "warm-up steps, world size 2 or more", lambda c: _periodic(c) and c.variant.get("warmup", 0) > 0, algorithm="SGD"),
    DistMutant("local_sgd_sum_not_mean", "local-sgd", f"{_HERE}:AveragerSums",
               "world size 2 or more", _periodic, algorithm="SGD"),
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


def _fsdp_shards_a_parameter(case) -> bool:
    """World size 2 or more, and a parameter FSDP shards: few_params keeps world size - 1 trainable
    parameters, and the first (mixed's 0-dim one) stays whole outside FSDP."""
    return case.world_size >= (3 if case.condition == "few_params" else 2)


DIST_MUTANTS += (
    DistMutant("fsdp_norm_over_local_shard", "fsdp", f"{_HERE}:AdafactorOnLocalShard",
               "a parameter sharded over 2 or more ranks (RMS and column statistics of the local shard only)",
               _fsdp_shards_a_parameter, algorithm="Adafactor"),
)
