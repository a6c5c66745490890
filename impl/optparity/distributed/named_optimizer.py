"""NamedOptimizer: an optimizer whose state_dict is keyed by parameter FQN (torch's _NamedOptimizer).

It wraps an ordinary optimizer built from `optimizer_class` and translates between the
positional keys torch.optim uses (0, 1, 2, ... in parameter order) and the names the
parameters were given. A checkpoint therefore survives a change of parameter order, and the
layout is exactly that of torch.distributed.optim._NamedOptimizer, so checkpoints move both
ways between the two.

Like upstream, it subclasses torch.optim.Optimizer (isinstance checks hold) without running
Optimizer.__init__: only what is defined here is supported; e.g. zero_grad and the step hooks
inherited from Optimizer fail, exactly as upstream's do.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from copy import deepcopy
from typing import Any

import torch
import torch.nn as nn
from torch import optim

__all__ = ["NamedOptimizer"]


def _sharded_tensor_type():
    # imported on first use: torch.distributed._shard is slow to import and rarely needed
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return ShardedTensor


def _is_fsdp(module) -> bool:
    if module is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def _param_group_key(param_keys) -> str:
    """Identify a param group by its (sorted) FQNs, whatever order they are listed in."""
    return "/".join(sorted(param_keys))


class NamedOptimizer(optim.Optimizer):
    """Wrap ``optimizer_class`` so that ``state_dict`` uses parameter names instead of indices.

    Args:
        named_parameters: mapping (or iterable of pairs, e.g. ``module.named_parameters()``)
            from FQN to parameter.
        optimizer_class: the optimizer class to wrap.
        param_groups: optional param groups for the optimizer; their params must all appear in
            ``named_parameters``. Default: one group with every named parameter.
        module: the module owning the parameters; when it is FSDP-wrapped, state dicts go
            through FSDP's optimizer-state conversion.
        args, kwargs: passed to the optimizer constructor.
    """

    def __init__(
        self,
        named_parameters: Mapping[str, torch.Tensor],
        optimizer_class: optim.Optimizer,
        param_groups: Collection[Mapping[str, Any]] | None = None,
        module: nn.Module | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.param_groups = param_groups  # checked (and normalised) in place next
        self._param_groups_check()
        self.named_parameters = dict(named_parameters)
        params_for_optimizer = self.named_parameters.values() if param_groups is None else param_groups
        self._optimizer = optimizer_class(params_for_optimizer, *args, **kwargs)
        self.module = module
        if param_groups is None:
            self.ordered_param_keys = list(self.named_parameters.keys())
        else:
            warnings.warn(
                "Since we pass in param_groups, we will use param_groups to "
                "initialize the optimizer, not all parameters of the module.",
                stacklevel=2,
            )
            key_of = {param: key for key, param in self.named_parameters.items()}
            ordered = []
            for group in param_groups:
                for param in group["params"]:
                    if param not in key_of:
                        raise ValueError(
                            f"Expect param name {param} found in param group but is missing."
                        )
                    ordered.append(key_of[param])
            self.ordered_param_keys = ordered
        # from now on the wrapped optimizer's groups are the groups
        self.param_groups = self._optimizer.param_groups

    def _param_groups_check(self) -> None:
        if self.param_groups is None:
            return
        for group in self.param_groups:
            if not isinstance(group, dict):
                raise AssertionError("param group must be a dict")
            if "params" not in group:
                raise AssertionError("param group must contain key params")
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for param in params:
                if not isinstance(param, torch.Tensor):
                    raise TypeError(
                        "optimizer can only optimize Tensors, "
                        "but one of the params is " + torch.typename(param)
                    )
            group["params"] = params

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict, with every parameter index replaced by its FQN.

        Each group lists its FQNs sorted; the other group entries are deep copies.
        """
        inner = self._optimizer.state_dict()
        keys = self.ordered_param_keys
        state = {keys[index]: value for index, value in inner["state"].items()}
        groups = []
        for group in inner["param_groups"]:
            named_group = {"params": sorted(keys[index] for index in group["params"])}
            for name, value in group.items():
                if name != "params":
                    named_group[name] = deepcopy(value)
            groups.append(named_group)
        return self._post_state_dict({"state": state, "param_groups": groups})

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step of the wrapped optimizer."""
        return self._optimizer.step(closure=closure)

    @property
    def state(self) -> Mapping[torch.Tensor, Any]:  # type: ignore[override]
        return self._optimizer.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an FQN-keyed state dict, copying tensors in place into the existing state.

        The optimizer state must exist already (run ``init_state`` or a step first): every
        loaded entry is checked against it. Parameters and groups missing from `state_dict`
        (e.g. never trained) are left as they are.
        """
        current = self._optimizer.state_dict()
        state_dict = self._pre_load_state_dict(state_dict)
        src_state = state_dict["state"]
        dst_state = current["state"]
        if len(dst_state) == 0:
            raise ValueError(
                "Expects the optim to be initialized before load but found not initialized."
            )

        sharded = None
        for index, key in enumerate(self.ordered_param_keys):
            if key not in src_state:
                continue
            src, dst = src_state[key], dst_state[index]
            if len(src) != len(dst):
                raise ValueError(
                    f"Expects equal length as {len(dst)} for parameter {key} but found: {len(src)}"
                )
            for name, dst_value in dst.items():
                if name not in src:
                    raise ValueError(
                        f"Expects state {name} for parameter {key} but not found."
                    )
                src_value = src[name]
                if sharded is None:
                    sharded = _sharded_tensor_type()
                if isinstance(dst_value, sharded):
                    if not isinstance(src_value, sharded):
                        raise AssertionError
                    # upstream's message names the two counts the other way round; kept
                    dst_shards, src_shards = dst_value.local_shards(), src_value.local_shards()
                    if len(dst_shards) != len(src_shards):
                        raise ValueError(
                            f"Expects equal number of shards as {len(src_shards)} but found "
                            f"{len(dst_shards)} for {key}/{name}"
                        )
                    for dst_shard, src_shard in zip(dst_shards, src_shards):
                        dst_shard.tensor.detach().copy_(src_shard.tensor)
                elif isinstance(dst_value, torch.Tensor):
                    if not isinstance(src_value, torch.Tensor):
                        raise AssertionError
                    dst_value.detach().copy_(src_value)
                else:
                    dst[name] = deepcopy(src_value)

        src_groups = {_param_group_key(g["params"]): g for g in state_dict["param_groups"]}
        for dst_group in current["param_groups"]:
            group_key = _param_group_key(self.ordered_param_keys[i] for i in dst_group["params"])
            src_group = src_groups.get(group_key)
            if src_group is None:
                continue  # a group the checkpoint does not know: keep its settings
            if len(src_group) != len(dst_group):
                raise ValueError(
                    f"Expects equal param_group size as {len(dst_group)} for group {group_key} "
                    f"but found {len(src_group)}."
                )
            for name in src_group:
                if name not in dst_group:
                    raise ValueError(
                        f"Expects group key {name} to be in group {group_key} in `state_dict` "
                        "but is missing."
                    )
                if name != "params":
                    dst_group[name] = deepcopy(src_group[name])

        self._optimizer.load_state_dict(current)
        # torch.optim's load_state_dict installs new group dicts; upstream keeps pointing at
        # the old ones here (so its param_groups go stale and schedulers edit dead dicts)
        self.param_groups = self._optimizer.param_groups

    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Add a param group; its params must all be among the named parameters."""
        if not isinstance(param_group, dict):
            raise AssertionError("param group must be a dict")
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)

        key_of = {param: key for key, param in self.named_parameters.items()}
        new_keys = []
        for param in param_group["params"]:
            if param not in key_of:
                raise ValueError("some parameters are not in the module")
            new_keys.append(key_of[param])
        # Unlike upstream, the names are recorded only once the wrapped optimizer accepted
        # the group, so a rejected group leaves the FQN bookkeeping untouched.
        self._optimizer.add_param_group(param_group)
        self.ordered_param_keys.extend(new_keys)
        self.param_groups = self._optimizer.param_groups

    def init_state(self) -> None:
        """Create the optimizer state now (a step on zero gradients), so a checkpoint can be
        loaded in place. Overwrites the ``.grad`` of every parameter that requires grad."""
        for param in self.named_parameters.values():
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
        self.step(closure=None)

    def _pre_load_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if _is_fsdp(self.module):
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.optim_state_dict_to_load(
                self.module, self._optimizer, state_dict, is_named_optimizer=True
            )
        return state_dict

    def _post_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if _is_fsdp(self.module):
            from torch.distributed.fsdp import FullyShardedDataParallel

            # upstream discards the converted dict and returns its input; kept
            FullyShardedDataParallel.optim_state_dict(self.module, self._optimizer, state_dict)
        return state_dict
