"""What all optparity.optim classes share: torch.optim.Optimizer does the parameter-group
bookkeeping, hooks and state_dict; on top of it come grad-mode handling, step-counter creation,
torch's constructor checks, and `TorchStyleOptimizer`, the scaffolding every torch.optim class
repeats (step(), the lazy-state loop of _init_group, __setstate__ with legacy `step` conversion).
Each class keeps what is its own: constructor checks in torch's order, state init, kernel call."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from optparity.functional._common import scalar_dtype


def grad_mode_from_differentiable(step):
    """Run `step` with autograd on only when the optimizer is differentiable (torch does the same)."""

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        previous = torch.is_grad_enabled()
        try:
            # Adafactor, Muon and SparseAdam have no such option: always no_grad
            torch.set_grad_enabled(self.defaults.get("differentiable", False))
            return step(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    return wrapper


def new_step_counter(param: Tensor, on_param_device: bool, is_fused: bool | None = None) -> Tensor:
    """A zero `step` tensor: on the param's device for capturable/fused, else a CPU scalar."""
    if on_param_device:
        return torch.zeros((), dtype=scalar_dtype(is_fused), device=param.device)
    return torch.tensor(0.0, dtype=scalar_dtype())


def step_to_tensor(value, on_param_device: bool, device, is_fused: bool | None = None) -> Tensor:
    """Convert a legacy float `step` found in a loaded state dict into a tensor (torch's __setstate__)."""
    if on_param_device:
        return torch.tensor(float(value), dtype=scalar_dtype(is_fused), device=device)
    return torch.tensor(float(value), dtype=scalar_dtype())


# --- constructor checks (messages are torch's; `not 0.0 <= x` also rejects NaN)

def check_tensor_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_non_negative(value, what: str) -> None:
    if not 0.0 <= value:
        raise ValueError(f"Invalid {what}: {value}")


def check_lr(lr) -> None:
    check_tensor_lr(lr)
    check_non_negative(lr, "learning rate")


def check_betas(betas) -> None:
    for i in (0, 1):
        if not 0.0 <= betas[i] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")


def check_fused_param(p: Tensor) -> None:
    """fused=True needs floating-point params on a device type with fused kernels (torch's
    list and order: it is part of the message)."""
    kinds = ["mps", "cuda", "xpu", "hpu", "cpu", "mtia", torch._C._get_privateuse1_backend_name()]
    if not (p.device.type in kinds and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {kinds} but {p.dtype} and {p.device.type}"
        )


# The flags torch's __setstate__ fills in for Adadelta, Adamax, RMSprop and Rprop, in its order.
FLAG_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("foreach", None),
    ("maximize", False),
    ("differentiable", False),
    ("capturable", False),
)


class TorchStyleOptimizer(Optimizer):
    """torch.optim.Optimizer plus the scaffolding torch.optim's classes each repeat.

    A subclass sets `kernel` (the functional function; the harness swaps it), `_state_keys`,
    `_setstate_defaults` and `_sparse_grad_error`, and writes `_init_state` (lazy state of one
    param) and `_step_group` (one kernel call, usually over `self._gather(group)`)."""

    kernel: Any
    # per-param state tensors the kernel takes after params and grads, in its argument order
    _state_keys: tuple[str, ...] = ()
    # (key, default) that torch's __setstate__ fills into loaded param groups, in its order
    _setstate_defaults: tuple[tuple[str, Any], ...] = ()
    # RuntimeError message for a sparse gradient (the default _init_group refuses them)
    _sparse_grad_error = ""
    # torch's step() starts with the graph-capture health check (SGD's and Adagrad's do not)
    _capture_health_check = True

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._setstate_defaults:
                group.setdefault(key, value)
            self._legacy_steps_to_tensors(group)

    def _step_placement(self, group) -> tuple[bool, bool | None]:
        """(on the param's device?, is_fused) for the group's `step` counters."""
        return group["capturable"], None

    def _new_step(self, group, p: Tensor) -> Tensor:
        return new_step_counter(p, *self._step_placement(group))

    def _legacy_steps_to_tensors(self, group) -> None:
        on_device, fused = self._step_placement(group)
        for p in group["params"]:
            p_state = self.state.get(p, [])
            # very old checkpoints stored `step` as a Python number
            if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                p_state["step"] = step_to_tensor(p_state["step"], on_device, p.device, fused)

    def _setup_fused(self, differentiable: bool, foreach, check_devices_once: bool) -> None:
        """fused=True: refuse differentiable, then foreach; let GradScaler hand the kernel
        grad_scale/found_inf instead of unscaling grads itself."""
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._step_supports_amp_scaling = True
        if check_devices_once:
            # SGD and Adagrad check one param's device and dtype, at the first step
            self._need_device_dtype_check_for_fused = True

    def _check_fused_device_once(self, p: Tensor) -> None:
        if getattr(self, "_need_device_dtype_check_for_fused", True):
            check_fused_param(p)
            self._need_device_dtype_check_for_fused = False

    def _kernel_state_keys(self, group) -> tuple[str | None, ...]:
        """The state key each kernel list is filled from; None leaves that list empty."""
        return self._state_keys

    def _init_state(self, group, p: Tensor, state: dict) -> None:
        raise NotImplementedError

    def _check_state(self, group, state: dict) -> None:
        """Per-param checks after state init (none by default)."""

    def _init_group(self, group, params_with_grad, grads, *state_lists):
        """Collect the params that have a grad, their grads and their state (created on first
        use) into the lists; returns whether any of those params is complex."""
        has_complex = False
        keys = self._kernel_state_keys(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= torch.is_complex(p)
            params_with_grad.append(p)
            if p.grad.is_sparse:
                raise RuntimeError(self._sparse_grad_error)
            grads.append(p.grad)

            state = self.state[p]
            if len(state) == 0:
                self._init_state(group, p, state)
            self._check_state(group, state)
            for key, tensors in zip(keys, state_lists, strict=True):
                if key is not None:
                    tensors.append(state[key])
        return has_complex

    def _gather(self, group):
        """Fresh lists (params, grads, one per `_state_keys`) filled by _init_group, and what
        _init_group returned."""
        lists = [[] for _ in range(2 + len(self._state_keys))]
        return lists, self._init_group(group, *lists)

    def _step_group(self, group) -> None:
        raise NotImplementedError

    @grad_mode_from_differentiable
    def step(self, closure=None):
        """One update of every param group; `closure` re-evaluates the model and returns the loss."""
        if self._capture_health_check:
            self._accelerator_graph_capture_health_check()

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            self._step_group(group)
        return loss
