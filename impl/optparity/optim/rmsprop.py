"""Drop-in replacement for torch.optim.RMSprop, running optparity's functional kernel."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional.rmsprop import rmsprop
from optparity.optim._base import grad_mode_from_differentiable, new_step_counter, step_to_tensor

__all__ = ["RMSprop"]


class RMSprop(Optimizer):
    """RMSprop with torch.optim.RMSprop's constructor, defaults, state layout and results."""

    # the harness swaps this to run bare functional kernels / mutants through the class
    kernel = staticmethod(rmsprop)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        # same checks, order and messages as torch (alpha is checked last)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")

        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in (
                ("momentum", 0),
                ("centered", False),
                ("foreach", None),
                ("maximize", False),
                ("differentiable", False),
                ("capturable", False),
            ):
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p, [])
                # old checkpoints stored `step` as a Python number
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = step_to_tensor(p_state["step"], group["capturable"], p.device)

    def _init_group(
        self,
        group: dict[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        square_avgs: list[Tensor],
        momentum_buffer_list: list[Tensor],
        grad_avgs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        has_complex = False
        use_momentum = group["momentum"] > 0
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            if p.grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                state["step"] = new_step_counter(p, group["capturable"])
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # optional buffers exist only when their feature is on
                if use_momentum:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"]:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

            square_avgs.append(state["square_avg"])
            state_steps.append(state["step"])
            if use_momentum:
                momentum_buffer_list.append(state["momentum_buffer"])
            if group["centered"]:
                grad_avgs.append(state["grad_avg"])
        return has_complex

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """Take one optimization step; `closure` re-evaluates the model and returns the loss."""
        self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params_with_grad: list[Tensor] = []
            grads: list[Tensor] = []
            square_avgs: list[Tensor] = []
            grad_avgs: list[Tensor] = []
            momentum_buffer_list: list[Tensor] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(
                group,
                params_with_grad,
                grads,
                square_avgs,
                momentum_buffer_list,
                grad_avgs,
                state_steps,
            )
            self.kernel(
                params_with_grad,
                grads,
                square_avgs,
                grad_avgs,
                momentum_buffer_list,
                state_steps,
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=group["centered"],
                foreach=group["foreach"],
                maximize=group["maximize"],
                differentiable=group["differentiable"],
                capturable=group["capturable"],
                has_complex=has_complex,
            )
        return loss
