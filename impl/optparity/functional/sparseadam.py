"""SparseAdam: Adam masked to the entries a sparse gradient holds, as torch.optim._functional
computes it, op for op.

The gradient is coalesced first (the update is not linear in it, so duplicate indices must be
summed), the moments are moved towards it only at its indices, and the bias corrections use a
Python-int step count. Moment updates are built as deltas (new - old) added back sparsely, and
those same deltas, plus the old values, become the numerator and denominator: the bits depend
on this order."""
from __future__ import annotations

import math

from torch import Tensor

__all__ = ["sparse_adam", "sparseadam"]


def sparse_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[int],
    *,
    eps: float,
    beta1: float,
    beta2: float,
    lr: float,
    maximize: bool,
) -> None:
    """Functional SparseAdam (see optparity.optim.SparseAdam); `state_steps` are Python ints,
    already incremented by the caller."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        grad = grad.coalesce()
        indices = grad._indices()
        values = grad._values()
        if values.numel() == 0:
            continue  # nothing to update (the caller has still counted the step)
        size = grad.size()

        def like_grad(new_values: Tensor) -> Tensor:
            # torch builds these with the legacy grad.new(...) constructor; so do we
            if indices.dim() == 0 or new_values.dim() == 0:
                return grad.new().resize_as_(grad)
            return grad.new(indices, new_values, size)

        exp_avg, exp_avg_sq, step = exp_avgs[i], exp_avg_sqs[i], state_steps[i]

        old_m = exp_avg.sparse_mask(grad)._values()
        delta_m = values.sub(old_m).mul_(1 - beta1)
        exp_avg.add_(like_grad(delta_m))
        old_v = exp_avg_sq.sparse_mask(grad)._values()
        delta_v = values.pow(2).sub_(old_v).mul_(1 - beta2)
        exp_avg_sq.add_(like_grad(delta_v))

        # the deltas become the new moments' values in place
        numer = delta_m.add_(old_m)
        delta_v.add_(old_v)
        denom = delta_v.sqrt_().add_(eps)
        del delta_m, delta_v

        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        step_size = lr * math.sqrt(bc2) / bc1
        param.add_(like_grad(-step_size * numer.div_(denom)))


# the registry's name for the kernel (torch's is sparse_adam)
sparseadam = sparse_adam
