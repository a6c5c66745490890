"""Kind `adapter`: anything else (an engine that owns its own step) through a small protocol.

The candidate is a class the user writes, about twenty lines (docs/distributed-check.md has a
worked example; optparity.harness.distributed.adapter_example:ZeroAdapter is it):

    class MyAdapter:
        def __init__(self, param_groups, optimizer_class, process_group=None, **hyper):
            # set up on this rank: param_groups are torch.optim-style groups of full tensors,
            # optimizer_class the torch.optim class of the algorithm, hyper its hyperparameters,
            # process_group the ranks to run on (None: all)
        def set_gradients(self, grads):   # one averaged global gradient (or None) per parameter
        def step(self):                   # every rank calls it
        def full_params(self):            # every parameter in full, in the order given
        def full_state_dict(self):        # collective: torch.optim's state_dict layout of the whole
                                          # optimizer on at least one rank, None on the others
        # optional: load_state_dict(sd), add_param_group(group), scale_lr(factor)

Every rank gets the same averaged global gradient; the reference is one process running
torch.optim.<ALGO> on it. The conditions the adapter's optional methods allow are run.
"""
from __future__ import annotations

from optparity.harness.distributed.base import CONDITIONS, RELOADS, Driver

REQUIRED = ("set_gradients", "step", "full_params", "full_state_dict")


class AdapterDriver(Driver):
    kind = "adapter"
    conditions = tuple(CONDITIONS)

    def detect(self, obj):
        if all(callable(getattr(obj, m, None)) for m in REQUIRED):
            return f"has {', '.join(REQUIRED)}"
        return None

    def validate(self, obj):
        super().validate(obj)
        missing = [m for m in REQUIRED if not callable(getattr(obj, m, None))]
        if missing:
            raise ValueError(f"{obj.__qualname__} does not follow the adapter protocol: it has no "
                             f"{', '.join(missing)} (docs/distributed-check.md, 'The adapter protocol')")

    def conditions_for(self, obj):
        lacks = {"load_state_dict": RELOADS, "add_param_group": ("add_param_group",), "scale_lr": ("lr_change",)}
        dropped = {c for method, conds in lacks.items() if not callable(getattr(obj, method, None)) for c in conds}
        return tuple(c for c in self.conditions if c not in dropped)

    def build(self, ctx, obj, params, groups, algorithm, hyper):
        from optparity.harness.algorithms import torch_class

        return obj(groups, torch_class(algorithm), process_group=ctx.group, **hyper)


DRIVERS = (AdapterDriver(),)
