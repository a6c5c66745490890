"""Drop-in replacement for torch.optim.Muon (2-D parameters only).

Same checks and messages, defaults and state: one `momentum_buffer` per param, created (zeros
like the grad) the first time the param has a gradient. No `step` counter is kept."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity.functional.muon import ADJUST_LR_FNS, DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, muon
from optparity.optim._base import TorchStyleOptimizer, check_tensor_lr

__all__ = ["Muon"]

_ADJUST_LR_FNS = list(ADJUST_LR_FNS)  # the installed torch's (spectral_unclamped from 2.14)


class Muon(TorchStyleOptimizer):
    """Muon: momentum orthogonalised by Newton-Schulz, for the 2-D weights of hidden layers.

    Arguments, defaults and behaviour are those of torch.optim.Muon."""

    kernel = staticmethod(muon)
    _state_keys = ("momentum_buffer",)
    _capture_health_check = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn is not None and adjust_lr_fn not in _ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        # Checked after the groups are built, so only the constructor's params (torch does
        # not check add_param_group's).
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        "Muon only supports 2D parameters whereas we found a parameter "
                        f"with size: {p.size()}"
                    )

    def _legacy_steps_to_tensors(self, group) -> None:
        pass  # Muon keeps no step counter

    def _init_group(self, group, params_with_grad, grads, momentum_bufs):
        for p in group["params"]:
            if p.grad is None:
                continue
            if torch.is_complex(p):
                raise RuntimeError("Muon does not support complex parameters")
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            params_with_grad.append(p)
            grads.append(p.grad)
            state = self.state[p]
            # torch tests for the key, not for an empty state
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            momentum_bufs.append(state["momentum_buffer"])
        return False  # complex params are refused above

    def _step_group(self, group) -> None:
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            ns_steps=group["ns_steps"],
            adjust_lr_fn=group["adjust_lr_fn"],
            has_complex=has_complex,
        )
