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
    # Edge conditions (see EDGE_AXES below): which axis built the case ("base" for the ordinary
    # matrix), "cheap" or "expensive" (only the full level runs those), torch intra-op threads
    # inside the case, torch.set_default_dtype inside it, steps driven by torch.amp.GradScaler.
    axis: str = "base"
    cost: str = "cheap"
    threads: int = 1
    default_dtype: torch.dtype | None = None
    amp: bool = False
    scheduler: str | None = None  # an LR scheduler recipe stepped alongside (harness/schedulers.py)

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        text = (f"{self.algorithm}/{self.path}/{dtype}/{self.param_set}/"
                f"c{self.config_index}[{format_config(self.config)}]")
        if self.axis != "base":
            text += f"/{self.axis}"
            if self.threads != 1:
                text += f",threads={self.threads}"
            if self.default_dtype is not None:
                text += f",default_dtype={str(self.default_dtype).replace('torch.', '')}"
            if self.amp:
                text += ",GradScaler"
            if self.scheduler:
                text += f",{self.scheduler}"
            if self.steps != STEPS:
                text += f",steps={self.steps}"
        return text

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


def _upstream_nondeterministic(algo: str, config: dict, path: str, dtype: torch.dtype, pset: str) -> bool:
    """Cases whose reference is not deterministic, so no candidate can match it bit for bit:
    torch 2.13's fused CPU SGD with momentum on float16/bfloat16 tensors of 64+ elements gives a
    different momentum_buffer from run to run (an element now and then is garbage, e.g. -inf) from
    the second step on (README, "What the harness found upstream")."""
    low = dtype in (torch.float16, torch.bfloat16) or pset == "dtype_mix"
    return algo == "SGD" and path == "fused" and bool(config.get("momentum")) and low


def build_cases(algorithms=ALGORITHMS, paths=PATHS, dtypes=DTYPES, param_sets=PARAM_SETS,
                steps: int = STEPS) -> list[Case]:
    """The base matrix over `dtypes` x `param_sets`, then each algorithm's edge cases (which pick
    their own dtypes and parameter sets; `paths` narrows them too, `steps` caps all but long runs)."""
    cases = []
    for algo in algorithms:
        for index, config in enumerate(configs(algo)):
            for path, dtype, pset in itertools.product(paths, dtypes, param_sets_for(algo, param_sets)):
                if not _runs(algo, path, dtype) or _upstream_nondeterministic(algo, config, path, dtype, pset):
                    continue
                case = Case(algo, config, path, dtype, pset, steps=steps, config_index=index,
                            second_group=spec(algo).second_group)
                case.seed = zlib.crc32(case.id.encode())  # stable whatever subset is chosen
                cases.append(case)
        cases += edge_cases(algo, paths, steps)
        from optparity.harness.schedulers import scheduler_cases  # it imports this module

        cases += scheduler_cases(algo, paths, dtypes, steps)
    return cases


# --- Edge axes: the conditions kernels break under, each on a chosen subset (the README's case
# matrix says which case covers which condition and why). Cheap ones run at the default level,
# expensive ones (huge tensors, long runs, every configuration) only at the full level.
EDGE_AXES = ("low_precision", "sizes", "tensor_count", "layouts", "values", "lengths", "threads",
             "dtype_mix", "amp", "default_dtype")
LONG_RUN = 300  # steps of the cheap long run; the full level runs FULL_LONG_RUN
FULL_LONG_RUN = 1000
THREADS = 2  # several intra-op threads (the full level adds 3: chunks not a multiple of a vector)
LOW = (torch.bfloat16, torch.float16)
_F32 = (torch.float32,)


def representative(algo: str) -> list[int]:
    """Config indices for the expensive axes: the defaults and the richest ordinary config (most
    options on; differentiable and capturable ones are their own matter)."""
    cfgs = configs(algo)
    plain = [i for i, c in enumerate(cfgs) if not c.get("differentiable") and not c.get("capturable")]
    richest = max(plain, key=lambda i: (len(cfgs[i]), -i)) if plain else 0
    return sorted({0, richest})


def _edge_plan(algo: str):
    """(axis, cost, config indices, paths, dtypes, param set, steps, extra Case fields) rows."""
    s = spec(algo)
    rep, every, first = representative(algo), list(range(len(configs(algo)))), [0]
    kernels = ("forloop", "foreach", "fused")
    base_set = param_sets_for(algo, ("mixed",))[0]
    lowp = LOW if s.low_precision else ()
    plan = [
        ("lengths", "cheap", first, ("forloop",), _F32, base_set, LONG_RUN, {}),
        ("lengths", "expensive", rep, kernels, _F32, base_set, FULL_LONG_RUN, {}),
        ("default_dtype", "cheap", rep, kernels, _F32, base_set, STEPS, {"default_dtype": torch.float64}),
        ("amp", "cheap", rep, kernels, _F32 + lowp[:1], base_set, STEPS, {"amp": True}),
        ("amp", "cheap", first, ("fused",), lowp, base_set, STEPS, {"amp": True}),
        ("amp", "expensive", every, PATHS, _F32 + lowp, base_set, STEPS, {"amp": True}),
    ]
    if lowp:
        plan += [("low_precision", "cheap", rep, PATHS, lowp, base_set, STEPS, {})]
    if s.kind == "dense":  # the sets below are of dense tensors of any shape
        plan += [
            ("sizes", "cheap", first, kernels, _F32, "sizes", 6, {}),
            ("sizes", "cheap", first, ("fused",) if s.fused_on_cpu else ("foreach",), lowp[:1], "sizes", 6, {}),
            ("sizes", "expensive", rep, PATHS, _F32 + lowp, "sizes_full", 4, {}),
            ("tensor_count", "cheap", first, ("foreach", "fused"), _F32, "many", 4, {}),
            ("tensor_count", "expensive", rep, PATHS, _F32 + lowp, "many_full", 6, {}),
            ("layouts", "cheap", rep, kernels, _F32, "layouts", STEPS, {}),
            ("layouts", "expensive", every, PATHS, (torch.float64,) + lowp, "layouts", STEPS, {}),
            ("values", "cheap", rep, kernels, _F32, "values", STEPS, {}),
            ("values", "cheap", first, ("forloop",), (torch.float64,) + lowp, "values", STEPS, {}),
            ("values", "expensive", every, PATHS, (torch.float32, torch.float64) + lowp, "values", STEPS, {}),
            ("threads", "cheap", first, kernels, _F32, "sizes", 4, {"threads": THREADS}),
            ("threads", "expensive", rep, PATHS, _F32 + lowp, "sizes_full", 3, {"threads": THREADS + 1}),
            # dtype_mix's own dtype only says whether the low-precision members are included
            ("dtype_mix", "cheap", rep, kernels, _F32 if lowp else (torch.float64,), "dtype_mix", STEPS, {}),
        ]
    return plan


def edge_cases(algo: str, paths=PATHS, steps: int = STEPS) -> list[Case]:
    out, seen = [], set()
    for axis, cost, indices, axis_paths, dtypes, pset, n, extra in _edge_plan(algo):
        n = n if axis == "lengths" else min(n, steps)
        for index, path, dtype in itertools.product(indices, axis_paths, dtypes):
            if (path not in paths or not _runs(algo, path, dtype)
                    or _upstream_nondeterministic(algo, configs(algo)[index], path, dtype, pset)):
                continue
            case = Case(algo, configs(algo)[index], path, dtype, pset, steps=n, config_index=index,
                        second_group=spec(algo).second_group, axis=axis, cost=cost, **extra)
            if case.id in seen:  # an expensive row repeating a cheap one
                continue
            seen.add(case.id)
            case.seed = zlib.crc32(case.id.encode())
            out.append(case)
    return out
