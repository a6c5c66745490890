"""Small pieces every functional optimizer needs: scalar handling, complex views,
path selection and grouping. None of this is algorithm math."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Devices whose foreach kernels torch prefers by default (CPU is *not* one of them:
# on CPU torch.optim defaults to the for-loop path).
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")
# Devices where torch.optim accepts capturable=True.
CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu", "xla")


def to_scalar(x: Any) -> Any:
    """A 1-element tensor hyperparameter becomes 0-dim; anything else is kept."""
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def as_python_number(x: Any) -> Any:
    """Tensor -> Python number via item(); torch does the same for speed in eager."""
    return x.item() if isinstance(x, Tensor) else x


def view_complex_as_real(params: list[Tensor], *others: list[Tensor]) -> None:
    """Replace complex tensors (and their companions at the same index) by real views, in place."""
    for i, p in enumerate(params):
        if torch.is_complex(p):
            params[i] = torch.view_as_real(p)
            for lst in others:
                lst[i] = torch.view_as_real(lst[i])


def default_foreach(params: list[Tensor], differentiable: bool) -> bool:
    """torch.optim's choice when foreach=None: foreach only when every tensor is a plain
    tensor on a foreach-default device (so never on CPU) and not differentiable."""
    if differentiable or torch.jit.is_scripting():
        return False
    return all(
        p is None
        or (type(p) is Tensor and p.device.type in _FOREACH_DEFAULT_DEVICES)  # torch: Parameters do not qualify
        for p in params
    )


def check_capturable_devices(param: Tensor, step: Tensor) -> None:
    if not (param.device.type == step.device.type and param.device.type in _capturable_devices()):
        raise AssertionError(
            "If capturable=True, params and state_steps must be on supported devices: "
            f"{_capturable_devices()}."
        )


def _capturable_devices() -> list[str]:
    return [*CAPTURABLE_DEVICES, torch._C._get_privateuse1_backend_name()]


def group_by_device_and_dtype(tensorlists: list[list[Tensor]]):
    """{(device, dtype): (tensorlists, indices)} — torch's own grouping, so foreach batches
    match torch.optim's exactly."""
    return torch._C._group_tensors_by_device_and_dtype(tensorlists, True)


def scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    """dtype of the `step` counter torch.optim keeps."""
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
