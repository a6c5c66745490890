"""Drop-in torch.optim.SGD: same arguments, checks, state layout and results."""
from __future__ import annotations

from torch import Tensor

from optparity.functional.sgd import sgd
from optparity.optim._base import TorchStyleOptimizer, check_tensor_lr

__all__ = ["SGD"]


class SGD(TorchStyleOptimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as torch.optim.SGD."""

    kernel = staticmethod(sgd)
    _state_keys = ("momentum_buffer",)
    _setstate_defaults = (
        ("nesterov", False),
        ("maximize", False),
        ("foreach", None),
        ("differentiable", False),
        ("fused", False),
    )
    _capture_health_check = False

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        check_tensor_lr(lr)
        # torch writes these as `x < 0.0`, so unlike other optimizers a NaN passes
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, defaults)

        if fused:
            self._setup_fused(differentiable, foreach, check_devices_once=True)

    def _legacy_steps_to_tensors(self, group) -> None:
        pass  # SGD keeps no step counter

    def _init_group(self, group, params, grads, momentum_buffer_list):
        has_sparse_grad = False
        track_momentum = group["momentum"] != 0
        for p in group["params"]:
            if p.grad is None:
                continue
            # fused kernels need float params on a supported device; checked once
            if group["fused"]:
                self._check_fused_device_once(p)
            params.append(p)
            grads.append(p.grad)
            if p.grad.is_sparse:
                has_sparse_grad = True
            if track_momentum:
                # touching self.state[p] creates an (empty) entry, as torch does
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        return has_sparse_grad

    def _step_group(self, group) -> None:
        (params, grads, momentum_buffer_list), has_sparse_grad = self._gather(group)
        self.kernel(
            params,
            grads,
            momentum_buffer_list,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
        )

        if group["momentum"] != 0:
            # the kernel may have created buffers: store them (or None) back
            for p, buf in zip(params, momentum_buffer_list, strict=True):
                self.state[p]["momentum_buffer"] = buf
