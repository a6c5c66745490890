"""AdamW (Loshchilov & Hutter, 2017): Adam with the weight decay applied to the
parameters directly instead of being added to the gradient. All math lives in
optparity.functional.adam; this entry point only fixes decoupled_weight_decay=True,
exactly as torch.optim.adamw.adamw delegates to torch.optim.adam.adam."""
from __future__ import annotations

from torch import Tensor

from optparity.functional.adam import adam

__all__ = ["adamw"]


def adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    *,
    amsgrad: bool,
    beta1,
    beta2,
    lr,
    weight_decay: float,
    eps: float,
    maximize: bool,
) -> None:
    """Functional AdamW: Adam with decoupled weight decay (see optparity.optim.AdamW)."""
    adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=foreach,
        capturable=capturable,
        differentiable=differentiable,
        fused=fused,
        grad_scale=grad_scale,
        found_inf=found_inf,
        has_complex=has_complex,
        amsgrad=amsgrad,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=maximize,
        decoupled_weight_decay=True,
    )
