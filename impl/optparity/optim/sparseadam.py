"""Drop-in replacement for torch.optim.SparseAdam (dense params, sparse gradients only).

Same checks and messages, defaults and state: `step` is a plain Python int (not a tensor, as
in every other algorithm), incremented before the kernel runs, `exp_avg` / `exp_avg_sq` are
dense like the param."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional._common import to_scalar
from optparity.functional.sparseadam import sparse_adam
from optparity.optim._base import TorchStyleOptimizer, check_tensor_lr

__all__ = ["SparseAdam"]


class SparseAdam(TorchStyleOptimizer):
    """Adam restricted to the entries present in each sparse gradient.

    Arguments, defaults and behaviour are those of torch.optim.SparseAdam."""

    kernel = staticmethod(sparse_adam)
    _state_keys = ("exp_avg", "exp_avg_sq", "step")
    _capture_health_check = False

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
    ) -> None:
        # strict inequalities for lr and eps, unlike Adam
        check_tensor_lr(lr)
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i in (0, 1):
            if not 0.0 <= betas[i] < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        defaults = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
        super().__init__(params, defaults)

        # every offending [group, index] is listed, sparse ones before complex ones
        sparse_at, complex_at = [], []
        for g, group in enumerate(self.param_groups):
            if not isinstance(group, dict):
                raise AssertionError(f"param_groups must be a list of dicts, but got {type(group)}")
            for j, p in enumerate(group["params"]):
                if p.is_sparse:
                    sparse_at.append([g, j])
                if p.is_complex():
                    complex_at.append([g, j])
        if sparse_at:
            raise ValueError(
                f"Sparse params at indices {sparse_at}: SparseAdam requires dense parameter tensors"
            )
        if complex_at:
            raise ValueError(
                f"Complex params at indices {complex_at}: SparseAdam does not support complex parameters"
            )

    def _legacy_steps_to_tensors(self, group) -> None:
        pass  # `step` is an int by design

    def _init_state(self, group, p: Tensor, state: dict) -> None:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            params_with_grad.append(p)
            if not p.grad.is_sparse:
                # the steps of this group's earlier params stay counted, as in torch
                raise RuntimeError(
                    "SparseAdam does not support dense gradients, please consider Adam instead"
                )
            grads.append(p.grad)
            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, p, state)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state["step"] += 1
            state_steps.append(state["step"])
        return False

    def _step_group(self, group) -> None:
        beta1, beta2 = group["betas"]
        maximize = group.get("maximize", False)  # pre-maximize checkpoints lack the key
        lists, _ = self._gather(group)
        self.kernel(
            *lists,
            eps=group["eps"],
            beta1=beta1,
            beta2=beta2,
            lr=to_scalar(group["lr"]),
            maximize=maximize,
        )
