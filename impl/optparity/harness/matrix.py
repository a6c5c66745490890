"""The case matrix: which configurations, paths, dtypes and parameter sets every check runs.

For each algorithm: every hyperparameter combination torch's own optimizer tests use
(torch.testing._internal.common_optimizers, CPU) plus our own additions, crossed with the
implementation path, the dtype and the parameter set. tests/test_matrix.py proves the torch
configurations are all here.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import torch

from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU

# "default" passes neither foreach nor fused: the optimizer's own choice must match torch's.
PATHS = ("forloop", "foreach", "fused", "default")
# "added_group" is "groups" with the second group given to add_param_group after construction.
PARAM_SETS = ("mixed", "groups", "added_group", "complex")
DTYPES = (torch.float32, torch.float64)
STEPS = 12
# A fresh optimizer is rebuilt from its own state_dict after RELOAD_OWN steps, and the candidate
# and reference swap state dicts after CROSS_LOAD steps.
RELOAD_OWN = 4
CROSS_LOAD = 8
# After LR_CHANGE steps every group's lr is halved, as a scheduler would: hyperparameters must be
# read from the param groups at every step, not cached.
LR_CHANGE = 6


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


# What torch's own tests use (see the module docstring) ...
TORCH_CONFIGS: dict[str, list[dict]] = {
    "Adadelta": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"maximize": True},
                 {"weight_decay": 0.1, "maximize": True}, {"rho": 0.95, "weight_decay": 0.9}],
    "Adagrad": [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True}, {"lr": 0.1},
                {"initial_accumulator_value": 0.1, "weight_decay": 0.1},
                {"lr": 0.1, "lr_decay": 0.5, "weight_decay": 0.1}, {"lr": _t(0.001)}],
    "Adam": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
             {"weight_decay": 0.1, "amsgrad": True}],
    "AdamW": [{}, {"lr": 0.01}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "maximize": True},
              {"weight_decay": 0.1, "amsgrad": True}],
    "Adamax": [{}, {"lr": 0.1}, {"weight_decay": 0.1}, {"maximize": True},
               {"weight_decay": 0.1, "maximize": True}],
    "RMSprop": [{}, {"lr": 0.001}, {"weight_decay": 0.1}, {"maximize": True},
                {"weight_decay": 0.1, "centered": True}, {"maximize": True, "weight_decay": 0.1},
                {"weight_decay": 0.1, "centered": True, "momentum": 0.1},
                {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True}],
    "Rprop": [{}, {"lr": 0.0002}, {"etas": (0.5, 1.5)}, {"step_sizes": (2e-06, 100)}, {"maximize": True}],
    "SGD": [{}, {"lr": 0.01}, {"lr": _t(0.001)}, {"weight_decay": 0.5}, {"momentum": 0.9},
            {"weight_decay": 0.1, "maximize": True}, {"momentum": 0.9, "dampening": 0.5},
            {"momentum": 0.9, "weight_decay": 0.1}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}],
}

# ... and what we add: options torch's list leaves out, tensor hyperparameters, differentiable.
EXTRA_CONFIGS: dict[str, list[dict]] = {
    "Adadelta": [{"lr": _t(0.5), "rho": 0.8, "eps": 1e-4}, {"differentiable": True, "weight_decay": 0.1}],
    "Adagrad": [{"lr_decay": 0.1, "maximize": True, "eps": 1e-6}, {"initial_accumulator_value": 0.5},
                {"differentiable": True, "weight_decay": 0.1, "lr_decay": 0.05}],
    "Adam": [{"amsgrad": True, "maximize": True, "weight_decay": 0.05}, {"lr": _t(0.01)},
             {"betas": (_t(0.8), _t(0.95)), "lr": _t(0.02)}, {"betas": (0.5, 0.6), "eps": 1e-3},
             {"weight_decay": 0.1, "decoupled_weight_decay": True, "amsgrad": True},
             {"differentiable": True, "weight_decay": 0.1, "amsgrad": True}, {"capturable": True}],
    "AdamW": [{"amsgrad": True, "maximize": True}, {"lr": _t(0.01), "weight_decay": 0.2},
              {"betas": (0.5, 0.6), "eps": 1e-3, "weight_decay": 0.0},
              {"differentiable": True, "amsgrad": True}],
    "Adamax": [{"lr": _t(0.05), "betas": (0.5, 0.7), "eps": 1e-4}, {"differentiable": True, "weight_decay": 0.1}],
    "RMSprop": [{"momentum": 0.5, "alpha": 0.9}, {"centered": True, "maximize": True, "lr": _t(0.01)},
                {"differentiable": True, "centered": True, "momentum": 0.2, "weight_decay": 0.1}],
    "Rprop": [{"lr": _t(0.01), "etas": (0.3, 1.7), "maximize": True}, {"differentiable": True},
              {"lr": 0.01, "step_sizes": (1e-3, 0.02)}],  # narrow enough that both clamps bite
    "SGD": [{"momentum": 0.9, "nesterov": True, "maximize": True}, {"momentum": 0.5, "dampening": 0.3, "weight_decay": 0.2},
            {"lr": _t(0.05), "momentum": 0.9}, {"differentiable": True, "momentum": 0.9, "weight_decay": 0.1}],
}

# Hyperparameters the second parameter group overrides in the "groups" parameter set.
SECOND_GROUP: dict[str, dict] = {
    "Adadelta": {"lr": 0.5, "rho": 0.7},
    "Adagrad": {"lr": 0.05, "eps": 1e-6},
    "Adam": {"lr": 0.003, "eps": 1e-6},
    "AdamW": {"lr": 0.003, "weight_decay": 0.05},
    "Adamax": {"lr": 0.01, "eps": 1e-6},
    "RMSprop": {"lr": 0.003, "alpha": 0.9},
    "Rprop": {"lr": 0.002, "etas": (0.4, 1.3)},
    "SGD": {"lr": 0.02, "weight_decay": 0.01},
}


def configs(algo: str) -> list[dict]:
    return TORCH_CONFIGS[algo] + EXTRA_CONFIGS[algo]


def format_config(config: dict) -> str:
    def fmt(v):
        if isinstance(v, torch.Tensor):
            return f"tensor({v.item():g})"
        if isinstance(v, tuple):
            return "(" + ",".join(fmt(x) for x in v) + ")"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in config.items()) or "defaults"


@dataclass
class Case:
    algorithm: str
    config: dict
    path: str
    dtype: torch.dtype
    param_set: str
    steps: int = STEPS
    seed: int = 0
    config_index: int = 0
    second_group: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.algorithm}/{self.path}/{dtype}/{self.param_set}/"
                f"c{self.config_index}[{format_config(self.config)}]")

    def path_kwargs(self) -> dict:
        return {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
                "default": {}}[self.path]


def build_cases(algorithms=ALGORITHMS, paths=PATHS, dtypes=DTYPES, param_sets=PARAM_SETS,
                steps: int = STEPS) -> list[Case]:
    cases = []
    for algo in algorithms:
        for index, config in enumerate(configs(algo)):
            for path, dtype, pset in itertools.product(paths, dtypes, param_sets):
                if path == "fused" and algo not in FUSED_ON_CPU:
                    continue
                case = Case(algo, config, path, dtype, pset, steps=steps, config_index=index,
                            second_group=SECOND_GROUP[algo])
                case.seed = zlib.crc32(case.id.encode())  # stable whatever subset is chosen
                cases.append(case)
    return cases
