"""What all optparity.optim classes share: torch.optim.Optimizer does the parameter-group
bookkeeping, hooks and state_dict; we add grad-mode handling and step-counter creation."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from optparity.functional._common import scalar_dtype


def grad_mode_from_differentiable(step):
    """Run `step` with autograd on only when the optimizer is differentiable (torch does the same)."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return step(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    return wrapper


def new_step_counter(param: Tensor, on_param_device: bool, is_fused: bool | None = None) -> Tensor:
    """A zero `step` tensor: on the param's device for capturable/fused, else a CPU scalar."""
    if on_param_device:
        return torch.zeros((), dtype=scalar_dtype(is_fused), device=param.device)
    return torch.tensor(0.0, dtype=scalar_dtype())


def step_to_tensor(value, on_param_device: bool, device, is_fused: bool | None = None) -> Tensor:
    """Convert a legacy float `step` found in a loaded state dict into a tensor (torch's __setstate__)."""
    if on_param_device:
        return torch.tensor(float(value), dtype=scalar_dtype(is_fused), device=device)
    return torch.tensor(float(value), dtype=scalar_dtype())
