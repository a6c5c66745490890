"""Small pieces every functional optimizer needs: scalar handling, complex views, path
selection and dispatch, torch's argument checks (with its exact messages), step counting,
per-device copies for the fused kernels, and grouping. None of this is algorithm math."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Devices whose foreach kernels torch prefers by default (CPU is *not* one of them:
# on CPU torch.optim defaults to the for-loop path).
_FOREACH_DEFAULT_DEVICES = ("cuda", "xpu", "mtia")


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


def capturable_devices(supports_xla: bool = True) -> list[str]:
    """Device types torch.optim accepts for capturable=True, in torch's order (the list is
    printed in the error, so order matters). Some paths of some algorithms leave out XLA."""
    kinds = ["cuda", "xpu", "hpu"]
    if not torch.jit.is_scripting():
        kinds.append(torch._C._get_privateuse1_backend_name())
    if supports_xla:
        kinds.append("xla")
    return kinds


def check_capturable(
    params: list[Tensor], state_steps: list[Tensor], supports_xla: bool = True, *,
    companions: tuple[list[Tensor], ...] = (), names: str = "params and state_steps",
) -> None:
    """capturable=True needs each param, its step (and its `companions`, other per-param
    scalar state) on one supported device type (never checked while compiling). `names` is
    how torch's message lists them. The for-loop paths call this one param at a time."""
    if torch.compiler.is_compiling():
        return
    kinds = capturable_devices(supports_xla)
    for p, step, *others in zip(params, state_steps, *companions, strict=True):
        same_kind = all(t.device.type == p.device.type for t in (step, *others))
        if not (same_kind and p.device.type in kinds):
            raise AssertionError(
                f"If capturable=True, {names} must be on supported devices: {kinds}."
            )


def check_state_steps(state_steps: list, skip_when_compiling: bool = True,
                      what: str = "state_steps") -> None:
    """Steps (or another per-param scalar state list, named `what`) must be tensors (a list
    of Python numbers is the pre-1.12 API)."""
    if skip_when_compiling and torch.compiler.is_compiling():
        return
    if not all(isinstance(s, Tensor) for s in state_steps):
        raise RuntimeError(
            f"API has changed, `{what}` argument must contain a list of singleton tensors"
        )


def choose_paths(params: list[Tensor], differentiable: bool, foreach: bool | None,
                 fused: bool | None = None, foreach_allowed: bool = True) -> tuple[bool, bool]:
    """(foreach, fused) as torch.optim picks them: when neither was given, foreach by device
    (default_foreach; `foreach_allowed=False` vetoes it) and never fused; an unset one is False."""
    if fused is None and foreach is None:
        foreach = default_foreach(params, differentiable) and foreach_allowed
    if fused is None:
        fused = False
    if foreach is None:
        foreach = False
    return foreach, fused


def pick_kernel(single, multi, params: list[Tensor], state_steps: list, foreach: bool | None,
                differentiable: bool, check_steps: bool = True):
    """Dispatch for an algorithm without a fused path, as torch does it: check state_steps
    (`check_steps=False`: the caller checks them its own way, or not at all), default foreach
    by device, refuse foreach under TorchScript; returns the kernel to run."""
    if check_steps:
        check_state_steps(state_steps)
    if foreach is None:
        foreach = default_foreach(params, differentiable)
    refuse_scripting(foreach)
    return multi if foreach else single


def refuse_scripting(foreach: bool, fused: bool = False) -> None:
    if torch.jit.is_scripting():
        if foreach:
            raise RuntimeError("torch.jit.script not supported with foreach optimizers")
        if fused:
            raise RuntimeError("torch.jit.script not supported with fused optimizers")


def refuse_amp_scaling(grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Only the fused paths take a GradScaler's grad_scale / found_inf."""
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Expected grad_scale and found_inf to be None")


def increment_steps(steps: list[Tensor]) -> None:
    """`step += 1` on a foreach group. On CPU, like torch, one wrapped 1.0 tensor (alpha picks
    the tensor overload) instead of wrapping the Python 1 for every element."""
    if not torch.compiler.is_compiling() and steps[0].is_cpu:
        torch._foreach_add_(steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


class PerDeviceLr:
    """The lr torch's fused Adam/AdamW/Adagrad paths hand each device group: a number or a
    CPU tensor as given; an accelerator tensor copied to each device once. As in torch, the
    lr in use switches only when a device is met for the first time."""

    def __init__(self, lr) -> None:
        self._lr = lr
        self._copies = (
            {lr.device: lr} if isinstance(lr, Tensor) and str(lr.device) != "cpu" else None
        )

    def on(self, device):
        if self._copies is not None and device not in self._copies:
            self._copies[device] = self._lr.to(device=device, non_blocking=True)
            self._lr = self._copies[device]
        return self._lr


class PerDevice:
    """A fused kernel's grad_scale / found_inf, copied to each device it is needed on, once.
    Holds None when the tensor is None."""

    def __init__(self, tensor: Tensor | None, non_blocking: bool) -> None:
        self._tensor = tensor
        self._non_blocking = non_blocking
        self._copies = {} if tensor is None else {tensor.device: tensor}

    def on(self, device) -> Tensor | None:
        if self._tensor is None:
            return None
        copy = self._tensor.to(device, non_blocking=self._non_blocking)
        return self._copies.setdefault(device, copy)


def group_by_device_and_dtype(tensorlists: list[list[Tensor]], with_indices: bool = True):
    """{(device, dtype): (tensorlists, indices)} — torch's own grouping, so foreach batches
    match torch.optim's exactly. torch.optim asks for indices only in SGD; the flag is also
    part of the TypeError a malformed list gets."""
    return torch._C._group_tensors_by_device_and_dtype(tensorlists, with_indices)


def scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    """dtype of the `step` counter torch.optim keeps."""
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
