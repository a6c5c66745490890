"""Drop-in replacement for torch.optim.Adafactor.

Same checks (messages included), defaults and lazy state: `step` (a CPU counter) and, for a
param of two or more dimensions, `row_var` / `col_var` (its shape with the last, resp. the
second-to-last, dimension reduced to 1); for a vector or scalar, a full `variance`."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.adafactor import adafactor
from optparity.optim._base import TorchStyleOptimizer, check_tensor_lr, new_step_counter

__all__ = ["Adafactor"]


class Adafactor(TorchStyleOptimizer):
    """Adafactor with relative step size, update clipping and decoupled weight decay.

    Arguments, defaults and behaviour are those of torch.optim.Adafactor."""

    kernel = staticmethod(adafactor)
    _state_keys = ("row_var", "col_var", "variance", "step")
    _setstate_defaults = (("foreach", None),)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        # torch's order and wording (`not a <= b` also rejects NaN)
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 >= beta2_decay:
            raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        if not 1.0 <= d:
            raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")
        defaults = dict(
            lr=lr,
            beta2_decay=beta2_decay,
            eps=eps,
            d=d,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
        )
        super().__init__(params, defaults)

    def _step_placement(self, group) -> tuple[bool, bool | None]:
        return False, None  # `step` always lives on the CPU

    def _init_state(self, group, p: Tensor, state: dict) -> None:
        state["step"] = new_step_counter(p, on_param_device=False)
        grad = p.grad
        if grad.dim() > 1:
            # the factors are shaped from the grad, not the param
            row_shape = list(grad.shape)
            row_shape[-1] = 1
            state["row_var"] = grad.new_zeros(row_shape)
            col_shape = list(grad.shape)
            col_shape[-2] = 1
            state["col_var"] = grad.new_zeros(col_shape)
        else:
            state["variance"] = torch.zeros_like(grad, memory_format=torch.preserve_format)

    def _init_group(self, group, params_with_grad, grads, row_vars, col_vars, variances, state_steps):
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Adafactor does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Adafactor does not support sparse gradients")
            params_with_grad.append(p)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, p, state)
            # a vector has no factors, a matrix no full variance: the kernel gets None there
            row_vars.append(state.get("row_var"))
            col_vars.append(state.get("col_var"))
            variances.append(state.get("variance"))
            state_steps.append(state["step"])
        return False  # complex params are refused above

    def _step_group(self, group) -> None:
        eps1, eps2 = group["eps"]
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            d=group["d"],
            lr=group["lr"],
            beta2_decay=group["beta2_decay"],
            weight_decay=group["weight_decay"],
            eps1=eps1,
            eps2=eps2,
            foreach=group["foreach"],
            maximize=group["maximize"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            has_complex=has_complex,
        )
