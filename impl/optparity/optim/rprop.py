"""Drop-in replacement for torch.optim.Rprop; the math lives in optparity.functional.rprop."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import to_scalar
from optparity.functional.rprop import rprop
from optparity.optim._base import FLAG_DEFAULTS, TorchStyleOptimizer, check_lr

__all__ = ["Rprop"]


class Rprop(TorchStyleOptimizer):
    """Resilient backpropagation, state-dict compatible with torch.optim.Rprop."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(rprop)
    _state_keys = ("prev", "step_size", "step")
    _setstate_defaults = FLAG_DEFAULTS
    _sparse_grad_error = "Rprop does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = (0.5, 1.2),
        step_sizes: tuple[float, float] = (1e-6, 50),
        *,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # Checked in torch's order so the first failing message is the same.
        check_lr(lr)
        if not 0.0 < etas[0] < 1.0 < etas[1]:
            raise ValueError(f"Invalid eta values: {etas[0]}, {etas[1]}")

        super().__init__(
            params,
            dict(
                lr=lr,
                etas=etas,
                step_sizes=step_sizes,
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                capturable=capturable,
            ),
        )

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        state["prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        # Initial step size = lr for every element (shaped like the grad); complex
        # params get lr on both the real and the imaginary part.
        if p.dtype.is_complex:
            fill = complex(group["lr"], group["lr"])
        else:
            fill = to_scalar(group["lr"])
        state["step_size"] = torch.full_like(p.grad, fill)

    def _step_group(self, group) -> None:
        etaminus, etaplus = group["etas"]
        step_size_min, step_size_max = group["step_sizes"]
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            step_size_min=step_size_min,
            step_size_max=step_size_max,
            etaminus=etaminus,
            etaplus=etaplus,
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=has_complex,
        )
