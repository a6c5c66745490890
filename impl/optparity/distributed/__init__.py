"""optparity.distributed — torch.distributed.optim's API, implemented over optparity.functional.

Names resolve lazily (RPC and process-group machinery are heavy to import):
  Functional<Algo>, as_functional_optim, functional_optim_map   functional_optim.py
  ZeroRedundancyOptimizer                                       zero_redundancy_optimizer.py
  PostLocalSGDOptimizer                                         post_localSGD_optimizer.py
  average_parameters, PeriodicModelAverager, HierarchicalModelAverager   model_averaging.py
  post_localSGD_hook, PostLocalSGDState                         comm_hooks.py
  DistributedOptimizer                                          optimizer.py (RPC)
  NamedOptimizer                                                named_optimizer.py
  apply_optimizer_in_backward, get_in_backward_optimizers       apply_optimizer_in_backward.py
"""
from __future__ import annotations

import importlib

_ALGOS = ("Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "RMSprop", "Rprop", "SGD")
_EXPORTS = {
    **{f"Functional{a}": "functional_optim" for a in _ALGOS},
    "as_functional_optim": "functional_optim",
    "functional_optim_map": "functional_optim",
    "register_functional_optim": "functional_optim",
    "ZeroRedundancyOptimizer": "zero_redundancy_optimizer",
    "PostLocalSGDOptimizer": "post_localSGD_optimizer",
    "average_parameters": "model_averaging",
    "PeriodicModelAverager": "model_averaging",
    "HierarchicalModelAverager": "model_averaging",
    "post_localSGD_hook": "comm_hooks",
    "PostLocalSGDState": "comm_hooks",
    "DistributedOptimizer": "optimizer",
    "NamedOptimizer": "named_optimizer",
    **{n: "optim_state" for n in (
        "OptimStateError", "optim_state_shard", "save_optim_state_shard", "load_optim_state_shards",
        "shards_to_full", "load_full_optim_state", "full_optim_state_dict", "optim_state_dict",
        "optim_state_dict_to_load", "shard_full_optim_state_dict", "scatter_full_optim_state_dict",
        "rekey_optim_state_dict", "to_fqn_keyed", "to_id_keyed", "get_optimizer_state_dict",
        "set_optimizer_state_dict")},
}
# Imported eagerly: the function shares its module's name, and a lazy lookup would hand out the
# module once anything imported it (torch's package does the same).
from optparity.distributed.apply_optimizer_in_backward import (  # noqa: E402
    apply_optimizer_in_backward,
    get_in_backward_optimizers,
)

__all__ = sorted([*_EXPORTS, "apply_optimizer_in_backward", "get_in_backward_optimizers"])


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'optparity.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"optparity.distributed.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
