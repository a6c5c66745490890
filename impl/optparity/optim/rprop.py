"""Drop-in replacement for torch.optim.Rprop; the math lives in optparity.functional.rprop."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional._common import to_scalar
from optparity.functional.rprop import rprop
from optparity.optim._base import grad_mode_from_differentiable, new_step_counter, step_to_tensor

__all__ = ["Rprop"]


class Rprop(Optimizer):
    """Resilient backpropagation, state-dict compatible with torch.optim.Rprop."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(rprop)

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
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
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

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (
                ("foreach", None),
                ("maximize", False),
                ("differentiable", False),
                ("capturable", False),
            ):
                group.setdefault(key, default)
            for p in group["params"]:
                st = self.state.get(p, [])
                # Old checkpoints stored `step` as a Python number.
                if len(st) != 0 and not torch.is_tensor(st["step"]):
                    st["step"] = step_to_tensor(st["step"], group["capturable"], p.device)

    def _init_group(self, group, params, grads, prevs, deltas, steps) -> bool:
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            grad = p.grad
            if grad.is_sparse:
                raise RuntimeError("Rprop does not support sparse gradients")
            grads.append(grad)

            st = self.state[p]
            if len(st) == 0:
                st["step"] = new_step_counter(p, group["capturable"])
                st["prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # Initial step size = lr for every element (shaped like the grad); complex
                # params get lr on both the real and the imaginary part.
                if p.dtype.is_complex:
                    fill = complex(group["lr"], group["lr"])
                else:
                    fill = to_scalar(group["lr"])
                st["step_size"] = torch.full_like(grad, fill)

            prevs.append(st["prev"])
            deltas.append(st["step_size"])
            steps.append(st["step"])
        return has_complex

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """One Rprop update of every group; `closure` re-evaluates and returns the loss."""
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            prevs: list[Tensor] = []
            deltas: list[Tensor] = []
            steps: list[Tensor] = []
            etaminus, etaplus = group["etas"]
            step_size_min, step_size_max = group["step_sizes"]

            has_complex = self._init_group(group, params, grads, prevs, deltas, steps)

            self.kernel(
                params,
                grads,
                prevs,
                deltas,
                steps,
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

        return loss
