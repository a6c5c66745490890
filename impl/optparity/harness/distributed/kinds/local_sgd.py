"""Kind `local-sgd`: model averaging after local steps, built like torch's
`PostLocalSGDOptimizer(optim=torch.optim.ALGO(...), averager=PeriodicModelAverager(period, warmup_steps))`.

The candidate is either the wrapper (a class taking optim= and averager=; it is given torch's
averager) or the averager (a class with average_parameters(params) taking period= and
warmup_steps=, or period_group_size_dict= like HierarchicalModelAverager; it runs inside torch's
PostLocalSGDOptimizer). Each rank gets its own local gradients, so the ranks drift apart between
averagings. The reference is torch's own PostLocalSGDOptimizer and averager in the same ranks,
on the same local gradients: every rank's parameters, its optimizer state and the averager's step
(state_dict()["step"]) are compared after every step; the reload condition resumes each rank
from its own state_dict in a fresh wrapper and averager.
"""
from __future__ import annotations

import collections
import copy
import inspect
import warnings

import torch

from optparity.harness.algorithms import torch_class
from optparity.harness.candidates import NotApplicable
from optparity.harness.distributed.base import Driver, OptimizerSide


def _parameters(obj) -> dict:
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return {}


def _is_wrapper(obj) -> bool:
    params = _parameters(obj)
    return "optim" in params and "averager" in params


def _is_averager(obj) -> bool:
    params = _parameters(obj)
    return hasattr(obj, "average_parameters") and ("period" in params or "period_group_size_dict" in params)


def _hierarchical_sizes(world_size: int, period: int) -> collections.OrderedDict:
    """Two levels: every `period` steps within groups of the largest proper divisor of the world
    size (1: no averaging at that level), every 2 * period steps over all ranks."""
    sub = max(d for d in range(1, world_size) if world_size % d == 0) if world_size > 1 else 1
    return collections.OrderedDict([(period, sub), (2 * period, world_size)])


def _averager(cls, variant: dict, ctx):
    period, warmup = variant.get("period", 2), variant.get("warmup", 0)
    if variant.get("hierarchical"):
        return cls(period_group_size_dict=_hierarchical_sizes(ctx.world_size, period), warmup_steps=warmup,
                   process_group=ctx.group)
    return cls(period=period, warmup_steps=warmup, process_group=ctx.group)


def _torch_averager_class(variant: dict):
    from torch.distributed.algorithms.model_averaging import averagers, hierarchical_model_averager

    return hierarchical_model_averager.HierarchicalModelAverager if variant.get("hierarchical") \
        else averagers.PeriodicModelAverager


class LocalSgdSide(OptimizerSide):
    """A model-averaging wrapper on one rank: its own parameters and its own state."""

    def full_state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(copy.deepcopy(sd))

    def scale_lr(self, factor: float):
        """A StepLR on the wrapped optimizer (the wrapper is no torch.optim.Optimizer), else by hand."""
        inner = getattr(self.opt, "optim", None)
        if not isinstance(inner, torch.optim.Optimizer):
            for group in self.opt.param_groups:
                group["lr"] = group["lr"] * factor
            return
        if self.scheduler is None:
            self.scheduler = torch.optim.lr_scheduler.StepLR(inner, step_size=1, gamma=factor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler.step()


class LocalSgdDriver(Driver):
    kind = "local-sgd"
    conditions = ("steps", "groups", "few_params", "lr_change", "add_param_group", "reload")
    local_grads = True
    ranks_agree = False
    state_per_rank = True

    def detect(self, obj):
        if _is_wrapper(obj):
            return "takes optim= and averager="
        if _is_averager(obj):
            return "has average_parameters and takes period="
        return None

    def validate(self, obj):
        super().validate(obj)
        if not (_is_wrapper(obj) or _is_averager(obj)):
            raise ValueError(f"{obj.__qualname__} is neither a model-averaging wrapper (a constructor taking optim= "
                             f"and averager=, like PostLocalSGDOptimizer) nor an averager (average_parameters(params), "
                             f"a constructor taking period= or period_group_size_dict=)")

    def reference_label(self, obj, algorithm):
        return (f"torch.distributed.optim:PostLocalSGDOptimizer over torch.optim:{algorithm} with torch's averager, "
                f"in the same ranks")

    def variants(self, level):
        out = [{"period": 2, "warmup": 0}, {"period": 3, "warmup": 2}, {"hierarchical": True, "period": 2, "warmup": 1}]
        if level != "quick":
            out.append({"period": 4, "warmup": 1})
        return out

    def _build(self, ctx, wrapper_cls, averager_cls, groups, algorithm, hyper):
        variant = ctx.case.variant
        params = _parameters(averager_cls)
        hierarchical = "period_group_size_dict" in params
        if bool(variant.get("hierarchical")) != hierarchical and averager_cls is not _torch_averager_class(variant):
            what = "hierarchical" if variant.get("hierarchical") else "periodic"
            raise NotApplicable(f"{averager_cls.__qualname__} is not a {what} averager", ("averager",))
        averager = _averager(averager_cls, variant, ctx)
        return LocalSgdSide(wrapper_cls(optim=torch_class(algorithm)(groups, **hyper), averager=averager),
                            [p for g in groups for p in g["params"]])

    def build(self, ctx, obj, params, groups, algorithm, hyper):
        from torch.distributed.optim import PostLocalSGDOptimizer

        if _is_wrapper(obj):
            return self._build(ctx, obj, _torch_averager_class(ctx.case.variant), groups, algorithm, hyper)
        return self._build(ctx, PostLocalSGDOptimizer, obj, groups, algorithm, hyper)

    def build_reference(self, ctx, params, groups, algorithm, hyper):
        from torch.distributed.optim import PostLocalSGDOptimizer

        return self._build(ctx, PostLocalSGDOptimizer, _torch_averager_class(ctx.case.variant), groups, algorithm,
                           hyper)


DRIVERS = (LocalSgdDriver(),)
