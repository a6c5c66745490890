"""The case matrix: which configurations, paths, dtypes and parameter sets every check runs.

For each algorithm: every hyperparameter combination torch's own optimizer tests use
(torch.testing._internal.common_optimizers, CPU) plus our own additions (both listed in the
algorithm's description, harness/algorithms/<algo>.py), crossed with the
implementation path, the dtype and the parameter set. tests/test_matrix.py proves the torch
configurations are all here.
"""
from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field

import torch

from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU, spec

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


def configs(algo: str) -> list[dict]:
    """torch's own test configurations, then ours (harness/algorithms/<algo>.py)."""
    return spec(algo).configs()


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
                            second_group=spec(algo).second_group)
                case.seed = zlib.crc32(case.id.encode())  # stable whatever subset is chosen
                cases.append(case)
    return cases
