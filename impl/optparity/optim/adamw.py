"""Drop-in replacement for torch.optim.AdamW: our Adam with decoupled weight decay
always on and a default weight_decay of 1e-2 (torch.optim.AdamW subclasses Adam the same way)."""
from __future__ import annotations

from torch import Tensor

from optparity.functional.adam import adam
from optparity.functional.adamw import adamw
from optparity.optim.adam import Adam

__all__ = ["AdamW"]


class AdamW(Adam):
    """AdamW; arguments, defaults and behaviour are those of torch.optim.AdamW."""

    kernel = staticmethod(adamw)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        # Whatever a loaded state dict says, AdamW stays decoupled (as in torch).
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def _run_kernel(self, group, tensor_lists, **kwargs) -> None:
        if group["decoupled_weight_decay"]:
            # adamw's signature has no decoupled_weight_decay: it is implied.
            self.kernel(*tensor_lists, **kwargs)
        else:
            # Only reachable if a user flips the flag on a live group; torch then runs
            # plain (coupled) Adam, and so do we.
            adam(*tensor_lists, decoupled_weight_decay=False, **kwargs)
