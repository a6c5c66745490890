"""Drop-in replacement for torch.optim.ASGD; the math lives in optparity.functional.asgd.

Construction checks, defaults, lazy state (`step`, `eta`, `mu`, `ax`, all on the param's
device whatever `capturable` says) and the kernel call match torch.optim.ASGD, so state dicts
move freely between the two."""
from __future__ import annotations

import torch
from torch import Tensor

from optparity import versions
from optparity.functional._common import scalar_dtype, to_scalar
from optparity.functional.asgd import asgd
from optparity.optim._base import (
    FLAG_DEFAULTS,
    TorchStyleOptimizer,
    check_lr,
    check_non_negative,
)

__all__ = ["ASGD"]


class ASGD(TorchStyleOptimizer):
    """Averaged SGD, state-dict compatible with torch.optim.ASGD."""

    # The harness swaps this to drive bare kernels / mutants through the class.
    kernel = staticmethod(asgd)
    _state_keys = ("ax", "mu", "eta", "step")
    _setstate_defaults = FLAG_DEFAULTS
    _sparse_grad_error = "ASGD does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lambd: float = 1e-4,
        alpha: float = 0.75,
        t0: float = 1e6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
    ) -> None:
        # torch 2.13 and 2.14 check only lr and weight_decay; 2.15 also lambd and alpha, between them
        check_lr(lr)
        if versions.at_least("2.15"):
            check_non_negative(lambd, "lambd value")
            check_non_negative(alpha, "alpha value")
        check_non_negative(weight_decay, "weight_decay value")

        super().__init__(
            params,
            dict(
                lr=lr,
                lambd=lambd,
                alpha=alpha,
                t0=t0,
                weight_decay=weight_decay,
                foreach=foreach,
                maximize=maximize,
                differentiable=differentiable,
                capturable=capturable,
            ),
        )

    def _step_placement(self, group) -> tuple[bool, bool | None]:
        # every scalar state of ASGD lives on the param's device
        return True, None

    def _legacy_steps_to_tensors(self, group) -> None:
        super()._legacy_steps_to_tensors(group)
        # old checkpoints also stored eta and mu as Python numbers
        for p in group["params"]:
            p_state = self.state.get(p, [])
            if len(p_state) == 0:
                continue
            for key in ("eta", "mu"):
                if not torch.is_tensor(p_state[key]):
                    p_state[key] = torch.tensor(p_state[key], dtype=scalar_dtype(), device=p.device)

    def _init_state(self, group, p, state) -> None:
        state["step"] = self._new_step(group, p)
        # a copy of the group's lr (a tensor lr is not aliased)
        state["eta"] = (
            torch.as_tensor(to_scalar(group["lr"]), device=p.device, dtype=scalar_dtype())
            .clone()
            .detach()
        )
        state["mu"] = torch.ones((), device=p.device, dtype=scalar_dtype())
        state["ax"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group) -> None:
        lists, has_complex = self._gather(group)
        self.kernel(
            *lists,
            lambd=group["lambd"],
            lr=group["lr"],
            t0=group["t0"],
            alpha=group["alpha"],
            weight_decay=group["weight_decay"],
            foreach=group["foreach"],
            maximize=group["maximize"],
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            has_complex=has_complex,
        )
