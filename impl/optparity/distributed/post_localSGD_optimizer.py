"""PostLocalSGDOptimizer, as torch.distributed.optim.PostLocalSGDOptimizer (torch 2.13).

Wraps any torch.optim-style optimizer: every ``step()`` runs the local optimizer, then hands
its param groups to a model averager (e.g. optparity's PeriodicModelAverager or
HierarchicalModelAverager), which averages on its own schedule. The checkpoint adds the
averager's call counter under ``"step"`` so a resumed run neither repeats warm-up nor shifts
the averaging period.

Deliberate difference: ``param_groups`` always reads through to the wrapped optimizer. Upstream
copies the list reference once in ``__init__``; torch.optim.Optimizer.load_state_dict then
installs a new list in the wrapped optimizer, so after a resume upstream's wrapper exposes stale
groups (e.g. an LR scheduler built on the wrapper would stop reaching the local optimizer).
Parameter values follow the same sequence either way.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["PostLocalSGDOptimizer"]


class PostLocalSGDOptimizer(torch.optim.Optimizer):
    """Post-local SGD: the local optimizer ``optim`` steps every iteration, then ``averager``
    averages the parameters when its schedule says so.

    Args:
        optim: the local optimizer.
        averager: a model averager (anything with ``average_parameters(params)`` and ``step``).
    """

    # Optimizer.__init__ is not called, as upstream: the wrapped optimizer owns groups, state, hooks.
    def __init__(self, optim, averager):
        self.optim = optim
        self.averager = averager

    @property
    def param_groups(self):  # type: ignore[override]
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, groups):
        self.optim.param_groups = groups

    @property
    def state(self):  # type: ignore[override]
        return self.optim.state

    @property
    def defaults(self):  # type: ignore[override]
        return self.optim.defaults

    def __repr__(self):
        return repr(self.optim)

    def state_dict(self):
        """The wrapped optimizer's state dict plus the averager's counter under ``"step"``."""
        sd = self.optim.state_dict()
        sd["step"] = self.averager.step
        return sd

    def load_state_dict(self, state_dict):
        """Load the wrapped optimizer's state and restore the averager's counter; a checkpoint
        without ``"step"`` restarts the counter at 0, with a warning."""
        self.optim.load_state_dict(state_dict)
        if "step" in state_dict:
            self.averager.step = state_dict["step"]
            return
        warnings.warn(
            "Loaded state dict does not contain a step counter for an averager. "
            "Setting step counter to 0.",
            stacklevel=2,
        )
        self.averager.step = 0

    def step(self):  # type: ignore[override]
        """One local update, then (maybe) one averaging of the updated parameters."""
        self.optim.step()
        self.averager.average_parameters(params=self.param_groups)

    def zero_grad(self, set_to_none: bool = True):  # type: ignore[override]
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)
