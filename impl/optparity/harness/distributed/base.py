"""The pieces every distributed kind shares: the case (DistCase), the conditions a case runs
under, the per-rank side protocol (Side) and the driver interface (Driver).

A *side* is one optimizer as one rank sees it: the candidate wrapper, or the reference. The
harness only ever talks to sides through the Side protocol, so a kind is just a way of turning a
candidate object into a Side (kinds/zero.py, kinds/local_sgd.py, kinds/adapter.py, ...). The
adapter kind hands the user this same protocol: their class *is* the side.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from optparity.harness.matrix import Case, format_config

STEPS = 8  # steps per distributed case (each one costs collectives)
ADD_AT = 3  # add_param_group: the second group joins before this step
LR_AT = 4  # lr_change: StepLR halves every group's lr after this step
RELOAD_AT = 4  # reload*: the consolidated state_dict is loaded into a fresh optimizer after this step

# name -> what it exercises. A driver lists the ones it supports (Driver.conditions); the level
# picks which of those run (harness/distributed/matrix.py).
CONDITIONS = {
    "steps": "every step: each rank's full parameters against the reference and against the other ranks; "
             "the consolidated state at steps 1, 4 and the last (the mixed set has a frozen parameter and "
             "one whose gradient is None now and then)",
    "groups": "two parameter groups with different hyperparameters",
    "few_params": "fewer trainable parameters than ranks: some rank owns an empty shard",
    "lr_change": f"a StepLR scheduler halves every group's lr after step {LR_AT}",
    "add_param_group": f"the second group is added with add_param_group before step {ADD_AT}",
    "reload": f"after step {RELOAD_AT}: the consolidated state_dict loaded into a fresh optimizer, same world size",
    "reload_down": f"after step {RELOAD_AT}: saved at world size N, loaded at N-1 (a subgroup of the ranks)",
    "reload_up": f"after step {RELOAD_AT}: saved at world size N-1 (a subgroup), loaded at N",
}
RELOADS = ("reload", "reload_down", "reload_up")


@dataclass
class DistCase(Case):
    """A matrix.Case run over `world_size` ranks under one distributed `condition`. `variant` holds
    kind-specific settings (local-sgd: the averager's period and warm-up)."""

    kind: str = "zero"
    world_size: int = 2
    condition: str = "steps"
    backend: str = "gloo"
    variant: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        text = super().id + f"/ws={self.world_size},{self.condition}"
        if self.variant:
            text += "," + format_config(self.variant)
        if self.backend != "gloo":
            text += f",{self.backend}"
        return text

    def report_fields(self) -> dict:
        """Extra columns of this case in JSON reports (harness/report.py)."""
        return {"kind": self.kind, "world_size": self.world_size, "condition": self.condition,
                "backend": self.backend, "variant": format_config(self.variant) if self.variant else None}

    @property
    def groups_before_after(self) -> tuple[int, int]:
        """How many ranks hold the candidate before and after the reload step."""
        n = self.world_size
        if self.condition == "reload_down":
            return n, max(n - 1, 1)
        if self.condition == "reload_up":
            return max(n - 1, 1), n
        return n, n


def with_fields(case: DistCase, **changes) -> DistCase:
    return dataclasses.replace(case, **changes)


class Side(Protocol):
    """One optimizer on one rank, as the harness drives it. Required:

      set_gradients(grads)   grads: one tensor (or None: no gradient this step) per parameter, in
                             the order of the parameters the side was set up with
      step()                 one optimizer step (collectives allowed: every rank calls it)
      full_params()          every parameter in full, in that order, as this rank sees it
      full_state_dict()      collective: a torch.optim-layout state_dict ({"state": {index: {...}},
                             "param_groups": [...]}) of the whole optimizer, on at least one rank
                             (None on the others)

    Optional (a condition whose method a side lacks is "not applicable"):
      load_state_dict(sd)    load a state_dict full_state_dict() returned (maybe at another world size)
      add_param_group(group) add {"params": [tensors], **overrides}
      scale_lr(factor)       multiply every group's lr (zero steps a real StepLR scheduler)
    """

    def set_gradients(self, grads: list[Tensor | None]) -> None: ...
    def step(self) -> Any: ...
    def full_params(self) -> list[Tensor]: ...
    def full_state_dict(self) -> dict | None: ...


@dataclass
class RankContext:
    """What a side is built with on a rank."""

    rank: int
    world_size: int
    case: DistCase
    device: str
    group: Any = None  # the process group the candidate runs on (None: the default group)
    group_ranks: tuple = ()  # the global ranks in it
    reference: Any = None  # --reference's object, for kinds that take one (Driver.takes_reference)

    @property
    def in_group(self) -> bool:
        return self.rank in self.group_ranks


class Driver:
    """How one kind of distributed optimizer is checked. Adding a kind = one module in
    harness/distributed/kinds/ defining DRIVERS = (YourDriver(),), a subclass of this.

    Parent side (before any rank starts; raise ValueError for bad input, it becomes exit 2):
      kind           the --kind name
      conditions     the CONDITIONS this kind supports (the level picks among them)
      detect(obj)    a short reason when `obj`'s signature looks like this kind, else None
      validate(obj)  raise ValueError when `obj` cannot be a candidate of this kind
      reference_label(obj, algorithm)  what the report calls the reference
      algorithms(obj, requested, level)  the torch.optim algorithms to run it with
      variants(level)  kind-specific settings, one case each (default: one, empty)
      conditions_for(obj)  the conditions this candidate supports (default: `conditions`)
      ranks_agree / state_per_rank / takes_reference  (see the attributes below)
    Rank side (inside harness/ranks.py's long-lived ranks):
      local_grads    False: every rank gets the same averaged global gradient (zero, fsdp, adapter);
                     True: each rank its own local gradient (local-sgd)
      build(ctx, obj, params, groups, algorithm, hyper)      the candidate's Side on ctx.group
      build_reference(ctx, params, groups, algorithm, hyper) the reference's Side; default: one
                     process torch.optim.<algorithm> on the same gradients (no collective)
    `groups` are torch.optim-style param groups over `params` (dicts of "params" and overrides).
    """

    kind: str = ""
    conditions: tuple[str, ...] = ("steps",)
    local_grads: bool = False
    # every rank holds the same full parameters after a step (compared rank against rank); False
    # for local-sgd, whose ranks drift apart between averagings
    ranks_agree: bool = True
    # full_state_dict() is each rank's own state (local-sgd), not one consolidated copy: a reload
    # loads each rank's own, and the parameters are not restored from the saving ranks
    state_per_rank: bool = False
    takes_reference: bool = False  # --reference names what to compare with (fsdp)
    # what a reference built per rank compares against: "unsharded" (one process, torch.optim) or
    # "same ranks" (torch's own class run in the same ranks, e.g. PostLocalSGDOptimizer)
    reference_kind: str = "unsharded"

    def detect(self, obj: Any) -> str | None:
        return None

    def validate(self, obj: Any) -> None:
        if not inspect.isclass(obj):
            raise ValueError(f"expected a class, got {type(obj).__name__}")

    def conditions_for(self, obj: Any) -> tuple[str, ...]:
        """The conditions `obj` can run under (default: all of the kind's)."""
        return self.conditions

    def reference_label(self, obj: Any, algorithm: str) -> str:
        return f"torch.optim:{algorithm} (one process, averaged gradients)"

    def algorithms(self, obj: Any, requested: str | None, level: str) -> list[str]:
        if requested is not None:
            return [requested]
        return list(DEFAULT_ALGORITHMS[level])

    def variants(self, level: str) -> list[dict]:
        return [{}]

    def build(self, ctx: RankContext, obj: Any, params: list[Tensor], groups: list[dict], algorithm: str,
              hyper: dict) -> Side:
        raise NotImplementedError

    def build_reference(self, ctx: RankContext, params: list[Tensor], groups: list[dict], algorithm: str,
                        hyper: dict) -> Side:
        from optparity.harness.algorithms import torch_class

        return OptimizerSide(torch_class(algorithm)(groups, **hyper))


# Without --algorithm: which algorithms a wrapper is run with, per level.
DEFAULT_ALGORITHMS = {
    "quick": ("Adam", "SGD"),
    "default": ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop"),
    "full": ("Adam", "AdamW", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adamax", "Rprop", "NAdam", "RAdam", "ASGD"),
}


def set_grads(params: list[Tensor], grads: list[Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


class OptimizerSide:
    """A torch.optim-style optimizer (or wrapper) holding full parameters on this rank."""

    def __init__(self, opt, params: list[Tensor] | None = None):
        self.opt = opt
        self.params = params if params is not None else [p for g in opt.param_groups for p in g["params"]]
        self.scheduler = None

    def set_gradients(self, grads):
        set_grads(self.params, grads)

    def step(self):
        return self.opt.step()

    def full_params(self):
        return self.params

    def full_state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, sd):
        self.opt.load_state_dict(sd)

    def add_param_group(self, group):
        self.params = self.params + [p for p in group["params"] if not any(p is q for q in self.params)]
        self.opt.add_param_group(group)

    def scale_lr(self, factor: float):
        """A real scheduler: StepLR(step_size=1, gamma=factor) stepped once."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" chatter
            if self.scheduler is None:
                self.scheduler = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=factor)
            self.scheduler.step()
