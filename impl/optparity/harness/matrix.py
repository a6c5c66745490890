"""The case matrix: which configurations, paths, dtypes and parameter sets every check runs.

For each algorithm: every hyperparameter combination torch's own optimizer tests use
(torch.testing._internal.common_optimizers, CPU) plus our own additions (both listed in the
algorithm's description, harness/algorithms/<algo>.py), crossed with the
implementation path, the dtype and the parameter set. tests/test_matrix.py proves the torch
configurations are all here.
"""
from __future__ import annotations

import inspect
import itertools
import zlib
from dataclasses import dataclass, field

import torch

from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU, spec

# "default" passes neither foreach nor fused: the optimizer's own choice must match torch's.
PATHS = ("forloop", "foreach", "fused", "default")
# "added_group" is "groups" with the second group given to add_param_group after construction;
# "sparse" (sparse gradients) only for the algorithms that take them (harness/params.py).
PARAM_SETS = ("mixed", "groups", "added_group", "complex", "sparse")
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


def param_sets_for(algo: str, param_sets) -> list[str]:
    """The requested sets as `algo` is fed (its description's kind): a "matrix" algorithm gets
    their 2-D forms, a "sparse" one their sparse-gradient forms; sets it cannot take are dropped."""
    s = spec(algo)
    prefix = {"matrix": "matrix", "sparse": "sparse_grads"}.get(s.kind)
    out = []
    for name in param_sets:
        if prefix is not None:
            if s.kind == "matrix" and name == "sparse":
                continue
            name = {"mixed": prefix, "sparse": prefix, "groups": f"{prefix}_groups",
                    "added_group": f"{prefix}_added_group"}.get(name)
        elif (name == "complex" and not s.complex) or (name == "sparse" and not s.sparse_grads):
            continue
        if name is not None and name not in out:
            out.append(name)
    return out


def _runs(algo: str, path: str, dtype: torch.dtype) -> bool:
    """Does `algo` have this path and dtype? A path whose flag torch's class does not take
    (Muon and SparseAdam have no foreach) is left out rather than run to a TypeError."""
    s = spec(algo)
    if (path == "fused" and algo not in FUSED_ON_CPU) or (path == "foreach" and not s.foreach):
        return False
    if path in ("forloop", "foreach") and "foreach" not in inspect.signature(s.torch_class()).parameters:
        return False
    return s.low_precision or dtype not in (torch.float16, torch.bfloat16)


def build_cases(algorithms=ALGORITHMS, paths=PATHS, dtypes=DTYPES, param_sets=PARAM_SETS,
                steps: int = STEPS) -> list[Case]:
    cases = []
    for algo in algorithms:
        for index, config in enumerate(configs(algo)):
            for path, dtype, pset in itertools.product(paths, dtypes, param_sets_for(algo, param_sets)):
                if not _runs(algo, path, dtype):
                    continue
                case = Case(algo, config, path, dtype, pset, steps=steps, config_index=index,
                            second_group=spec(algo).second_group)
                case.seed = zlib.crc32(case.id.encode())  # stable whatever subset is chosen
                cases.append(case)
    return cases
