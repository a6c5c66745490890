"""Optimizer steps fused into backward (torch.distributed.optim._apply_optimizer_in_backward).

Each parameter gets its own optimizer instance(s); a hook on the parameter's AccumulateGrad
node steps them as soon as its gradient has been accumulated, then drops the gradient
(``param.grad = None``), so the whole-model gradient never has to exist at once.

Parameters carry the same attributes as upstream (``_in_backward_optimizers``,
``_optimizer_classes``, ``_optimizer_kwargs``), which is what DDP, FSDP and the DDP
optimizer-overlap comm hook read.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["apply_optimizer_in_backward", "get_in_backward_optimizers"]


def _torch_tables():
    """torch's own tables (param -> hook handles, param -> AccumulateGrad node).

    Shared on purpose: DDP looks up torch's handle table to remove these hooks when it takes
    over the in-backward step (it steps after its allreduce); with a private table our hooks
    would stay and every parameter would step twice. Sharing the node table too means a
    parameter keeps a single node whichever implementation attached to it first. Both are
    weakly keyed by parameter.

    Imported on first use: importing torch.distributed.optim scripts some of its functions,
    which is slow and makes torch warn about its own TorchScript use.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import apply_optimizer_in_backward as torch_module
    return torch_module.param_to_optim_hook_handle_map, torch_module.param_to_acc_grad_map


def __getattr__(name: str):
    # the tables are also reachable under upstream's names, e.g. for DDP-style callers
    if name == "param_to_optim_hook_handle_map":
        return _torch_tables()[0]
    if name == "param_to_acc_grad_map":
        return _torch_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _accumulate_grad_node(param: torch.Tensor, acc_grad_map):
    """The AccumulateGrad node of `param`, found (and kept alive) once per parameter."""
    if param not in acc_grad_map:
        # A view's grad_fn leads straight back to the leaf's AccumulateGrad node. The node is
        # otherwise only weakly held by autograd; keeping it here keeps its hooks alive.
        acc_grad_map[param] = param.view_as(param).grad_fn.next_functions[0][0]
    return acc_grad_map[param]


def _step_and_release(param: torch.Tensor):
    def hook(*_unused) -> None:
        # every optimizer attached to this parameter, then free the gradient
        for opt in param._in_backward_optimizers:
            opt.step()
        param.grad = None

    return hook


def apply_optimizer_in_backward(
    optimizer_class: type[torch.optim.Optimizer],
    params: Iterable[torch.nn.Parameter],
    optimizer_kwargs: dict[str, Any],
    register_hook: bool = True,
) -> None:
    """Give each of `params` its own ``optimizer_class([param], **optimizer_kwargs)``, stepped
    in backward right after the parameter's gradient is accumulated (the gradient is then set
    to None, so any other optimizer over these parameters sees no gradient).

    Args:
        optimizer_class: the optimizer class to apply to each parameter.
        params: the parameters.
        optimizer_kwargs: constructor keyword arguments.
        register_hook: whether to register the stepping hook (default). Without it the
            optimizers are only attached, for callers (such as DDP) that step them themselves.
    """
    # Build everything first and attach afterwards: a parameter that cannot take a hook, or
    # an optimizer that refuses its arguments, fails (with upstream's error) before any
    # parameter has been changed. Per parameter the order is upstream's: node, then optimizer.
    handle_map, acc_grad_map = _torch_tables()
    prepared = []
    for param in params:
        node = _accumulate_grad_node(param, acc_grad_map)
        prepared.append((param, node, optimizer_class([param], **optimizer_kwargs)))

    for param, node, optimizer in prepared:
        if not hasattr(param, "_in_backward_optimizers"):
            param._in_backward_optimizers = []
            param._optimizer_classes = []
            param._optimizer_kwargs = []
        param._in_backward_optimizers.append(optimizer)
        param._optimizer_classes.append(optimizer_class)
        param._optimizer_kwargs.append(optimizer_kwargs)
        if not register_hook:
            continue
        # one hook per attached optimizer, each stepping all of them, as upstream: a second
        # hook on the same parameter then finds grad None and its steps skip the parameter
        handle = node.register_hook(_step_and_release(param))
        handle_map.setdefault(param, []).append(handle)


def get_in_backward_optimizers(module: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """All in-backward optimizers attached to `module`'s parameters, in parameter order.

    Meant for checkpointing; their step/zero_grad are not for the user to call.
    """
    optimizers: list[torch.optim.Optimizer] = []
    for param in module.parameters():
        optimizers.extend(getattr(param, "_in_backward_optimizers", []))
    return optimizers
