"""Drop-in replacement for torch.optim.Adamax; the math lives in optparity.functional.adamax."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional.adamax import adamax
from optparity.optim._base import grad_mode_from_differentiable, new_step_counter, step_to_tensor

__all__ = ["Adamax"]


class Adamax(Optimizer):
    """Adamax (Adam with an infinity-norm second moment), state-dict compatible with torch's."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(adamax)

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        # Checked in torch's order so the first failing message is the same.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        super().__init__(
            params,
            dict(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
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

    def _init_group(self, group, params, grads, exp_avgs, exp_infs, steps) -> bool:
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params.append(p)
            if p.grad.is_sparse:
                raise RuntimeError("Adamax does not support sparse gradients")
            grads.append(p.grad)

            st = self.state[p]
            if len(st) == 0:
                st["step"] = new_step_counter(p, group["capturable"])
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)

            exp_avgs.append(st["exp_avg"])
            exp_infs.append(st["exp_inf"])
            steps.append(st["step"])
        return has_complex

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """One Adamax update of every group; `closure` re-evaluates and returns the loss."""
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_infs: list[Tensor] = []
            steps: list[Tensor] = []
            beta1, beta2 = group["betas"]

            has_complex = self._init_group(group, params, grads, exp_avgs, exp_infs, steps)

            self.kernel(
                params,
                grads,
                exp_avgs,
                exp_infs,
                steps,
                eps=group["eps"],
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
            )

        return loss
