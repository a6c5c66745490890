"""Kind `zero`: a sharded-optimizer wrapper built like torch's ZeroRedundancyOptimizer,
`Name(params, optimizer_class=torch.optim.ALGO, process_group=..., **hyper)`, or with fairscale
OSS's spelling `Name(params, optim=torch.optim.ALGO, group=..., **hyper)`.

Every rank sets the same averaged global gradient and steps; the reference is one process running
torch.optim.ALGO on those gradients. The consolidated state is `consolidate_state_dict(to=...)`
(OSS: `recipient_rank=`) onto the last rank of the group (not rank 0: a wrapper that only
consolidates to 0 shows), then `state_dict()` there.
"""
from __future__ import annotations

import copy
import inspect

import torch.distributed as dist

from optparity.harness.algorithms import torch_class
from optparity.harness.distributed.base import CONDITIONS, Driver, OptimizerSide, RankContext


def _parameters(obj) -> dict:
    try:
        return dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return {}


def _class_keyword(obj) -> str | None:
    """The constructor keyword that takes the local optimizer's class."""
    params = _parameters(obj)
    return next((k for k in ("optimizer_class", "optim") if k in params), None)


def _group_keyword(obj) -> str | None:
    params = _parameters(obj)
    return next((k for k in ("process_group", "group") if k in params), None)


def _recipient_keyword(method) -> str | None:
    params = _parameters(method)
    return next((k for k in ("to", "recipient_rank") if k in params), None)


class ZeroSide(OptimizerSide):
    """A ZeRO-style wrapper on one rank: full parameters after every step, the state sharded."""

    def __init__(self, opt, params, ctx: RankContext):
        super().__init__(opt, params)
        self.ctx = ctx

    def full_state_dict(self):
        to = len(self.ctx.group_ranks) - 1  # the group's last rank (a group rank, as `to` is)
        keyword = _recipient_keyword(self.opt.consolidate_state_dict)
        if keyword is None:
            self.opt.consolidate_state_dict(to)
        else:
            self.opt.consolidate_state_dict(**{keyword: to})
        group_rank = dist.get_rank(self.ctx.group) if self.ctx.group is not None else self.ctx.rank
        return self.opt.state_dict() if group_rank == to else None

    def load_state_dict(self, sd):
        self.opt.load_state_dict(copy.deepcopy(sd))  # torch's ZeRO edits the dict it is given


class ZeroDriver(Driver):
    kind = "zero"
    conditions = tuple(CONDITIONS)

    def detect(self, obj):
        keyword = _class_keyword(obj)
        if keyword and hasattr(obj, "consolidate_state_dict"):
            return f"takes {keyword}= and has consolidate_state_dict"
        return None

    def validate(self, obj):
        super().validate(obj)
        if _class_keyword(obj) is None:
            raise ValueError(f"{obj.__qualname__} is not a ZeRO-style wrapper: its constructor takes neither "
                             f"optimizer_class= (torch's ZeroRedundancyOptimizer) nor optim= (fairscale's OSS)")
        missing = [m for m in ("step", "consolidate_state_dict", "state_dict", "load_state_dict") if not hasattr(obj, m)]
        if missing:
            raise ValueError(f"{obj.__qualname__} is not a ZeRO-style wrapper: it has no {', '.join(missing)}")

    def reference_label(self, obj, algorithm):
        return f"torch.optim:{algorithm} (one process, the averaged gradients)"

    def build(self, ctx, obj, params, groups, algorithm, hyper):
        kwargs = {_class_keyword(obj): torch_class(algorithm), **hyper}
        group_keyword = _group_keyword(obj)
        if ctx.group is not None:
            if group_keyword is None:
                from optparity.harness.candidates import NotApplicable

                raise NotApplicable(f"{obj.__qualname__} takes no process_group (or group): it cannot run on a "
                                    f"subgroup of the ranks", ("process_group",))
            kwargs[group_keyword] = ctx.group
        return ZeroSide(obj(groups, **kwargs), list(params), ctx)


DRIVERS = (ZeroDriver(),)
