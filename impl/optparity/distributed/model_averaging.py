"""Model averaging for post-local SGD, as torch.distributed.algorithms.model_averaging (torch 2.13).

Covers the three upstream modules in one place:
  utils        average_parameters, get_params_to_average, average_parameters_or_parameter_groups
  averagers    ModelAverager, PeriodicModelAverager
  hierarchical HierarchicalModelAverager

Averaging concatenates every parameter into one flat buffer (promoting mixed dtypes the way
torch.cat does), divides by the group size, all-reduces (sum) and then rebinds each
``param.data`` to a slice of that buffer cast back to the parameter's dtype. Dividing before
the reduction, and rebinding rather than copying, are both what upstream does, so values and
aliasing match it bit for bit.

Deliberate difference: HierarchicalModelAverager validates every group size and ``warmup_steps``
before it creates any subgroup, so bad input leaves no half-built hierarchy (upstream creates
subgroups first and may fail halfway). Which error wins, its type and its message are upstream's.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "average_parameters",
    "get_params_to_average",
    "average_parameters_or_parameter_groups",
    "ModelAverager",
    "PeriodicModelAverager",
    "HierarchicalModelAverager",
]

logger = logging.getLogger(__name__)

_PERIOD_ONE_ADVICE = (
    "no need to use model averaging because the communication cost "
    "of all-reducing parameters will be no less than the cost of all-reducing gradients "
    "by DistributedDataParallel in the backward pass. Therefore, only "
    "DistributedDataParallel should be used for this case."
)


# ---------------------------------------------------------------------------
# the averaging primitive
# ---------------------------------------------------------------------------

def average_parameters(params: Iterator[torch.nn.Parameter], process_group) -> None:
    """Replace every tensor in ``params`` by its mean over ``process_group`` (None: the world).

    A rank outside the group leaves its parameters untouched. Needs one extra buffer the size
    of all parameters together.
    """
    group = process_group if process_group is not None else dist.group.WORLD
    if dist._rank_not_in_group(group):
        return

    # two passes over what may be a one-shot iterator
    to_pack, to_unpack = itertools.tee(params)
    flat = torch.cat([p.data.reshape(-1) for p in to_pack])
    # divide first: the sum of already-scaled values is what upstream reduces
    flat /= dist.get_world_size(group)
    # other streams may still be writing the parameters on an accelerator
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()
    dist.all_reduce(flat, group=group)

    start = 0
    for p in to_unpack:
        n = p.numel()
        p.data = flat[start:start + n].view_as(p).type_as(p)
        start += n


def get_params_to_average(params) -> list[torch.nn.Parameter]:
    """The parameters (from ``model.parameters()`` or ``optimizer.param_groups``) that have a grad."""
    selected = []
    for item in params:
        if isinstance(item, torch.nn.Parameter):
            if item.grad is not None:
                selected.append(item)
        elif isinstance(item, dict):
            selected.extend(p for p in item["params"] if p.grad is not None)
        else:
            raise NotImplementedError(f"Parameter input of type {type(item)} is not supported")
    return selected


def average_parameters_or_parameter_groups(params, process_group) -> None:
    """Average a model's parameters or an optimizer's param groups, skipping grad-less ones."""
    average_parameters(iter(get_params_to_average(params)), process_group)


# ---------------------------------------------------------------------------
# averagers
# ---------------------------------------------------------------------------

def _world_or(process_group):
    if process_group is not None:
        return process_group
    world = dist.group.WORLD
    if world is None:  # no default process group yet
        raise TypeError("Invariant encountered: value was None when it should not be")
    return world


class ModelAverager(ABC):
    """Base of the averagers: the group to average over (default: the world) and a step counter
    that ``average_parameters`` advances once per call."""

    def __init__(self, process_group=None):
        self.process_group = _world_or(process_group)
        self.step = 0

    @abstractmethod
    def average_parameters(self, params):
        raise NotImplementedError


class PeriodicModelAverager(ModelAverager):
    """Average every ``period`` calls once ``warmup_steps`` calls have passed (post-local SGD)."""

    def __init__(self, period, warmup_steps=0, process_group=None):
        super().__init__(process_group)
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")
        self.warmup_steps = warmup_steps
        if period < 1:
            raise ValueError("Arg ``period`` must be a positive value.")
        if period == 1:
            warnings.warn("When period is 1, " + _PERIOD_ONE_ADVICE, stacklevel=2)
        self.period = period

    def average_parameters(self, params):
        """Average ``params`` (parameters or param groups) if this call is on the schedule."""
        past_warmup = self.step >= self.warmup_steps
        if past_warmup and (self.step - self.warmup_steps) % self.period == 0:
            average_parameters_or_parameter_groups(params, self.process_group)
        self.step += 1


def _check_subgroup_size(group_size, overall: int) -> None:
    # the checks dist.new_subgroups makes, done up front for every level
    if group_size <= 0:
        raise ValueError(f"The arg 'group_size' ({group_size}) must be positive")
    if overall < group_size:
        raise ValueError(
            f"The arg 'group_size' ({group_size}) must not exceed the world size ({overall})"
        )
    if overall % group_size != 0:
        raise ValueError(f"The world size ({overall}) must be divisible by '{group_size=}'")


class HierarchicalModelAverager(ModelAverager):
    """Hierarchical SGD: each ``period -> group_size`` entry averages within groups of that size
    every ``period`` calls after ``warmup_steps``; on a call several periods divide, only the
    largest of them (the last in dict order) runs. The last group size must be the size of
    ``process_group`` (the world by default)."""

    def __init__(self, period_group_size_dict=None, warmup_steps=0, process_group=None):
        super().__init__(process_group)
        if not period_group_size_dict:
            raise ValueError("Arg ``period_group_size_dict`` must not be empty.")
        self._periods = list(period_group_size_dict.keys())
        sizes = list(period_group_size_dict.values())
        # like upstream, only the first period is checked, and keys are not required to be sorted
        if self._periods[0] <= 0:
            raise ValueError(
                "The minimum period in arg ``period_group_size_dict`` must be a positive value."
            )
        if self._periods[-1] == 1:
            warnings.warn(
                "When the maximum period in arg ``period_group_size_dict`` is 1, " + _PERIOD_ONE_ADVICE,
                stacklevel=2,
            )
        overall = dist.get_world_size(group=self.process_group)
        if sizes[-1] != overall:
            raise ValueError(
                f"The last value in arg ``period_group_size_dict`` {sizes[-1]} "
                f"must be equal to the size of arg ``process_group`` {overall}."
            )
        # upstream meets a bad group size (inside new_subgroups) before a bad warmup_steps
        for size in sizes:
            if size is None:
                break  # new_subgroups picks a device-count default (or refuses) for None
            if size != overall:
                _check_subgroup_size(size, overall)
        if warmup_steps < 0:
            raise ValueError("Arg ``warmup_steps`` must be a non-negative number.")

        # every rank creates the same subgroups in the same order (new_group is collective)
        self.period_process_group_dict = OrderedDict()
        logger.info("Model averaging hierarchy:")
        for period, size in period_group_size_dict.items():
            logger.info("\tgroups of %s processes average every %s iterations "
                        "unless a higher level averages then.", size, period)
            if size == overall:
                self.period_process_group_dict[period] = self.process_group
            else:
                self.period_process_group_dict[period], _ = dist.new_subgroups(
                    group_size=size, group=self.process_group
                )
        self.warmup_steps = warmup_steps

    def _find_process_group(self):
        """The group of the largest period dividing ``step`` (scanning keys from the last), or None."""
        for period in reversed(self._periods):
            if self.step % period == 0:
                return self.period_process_group_dict[period]
        return None

    def average_parameters(self, params):
        """Average ``params`` (parameters or param groups) in the group this call's step selects."""
        if self.step >= self.warmup_steps:
            group = self._find_process_group()
            if group is not None:
                average_parameters_or_parameter_groups(params, group)
        self.step += 1
