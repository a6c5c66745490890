"""The distributed matrix per level, from the single-process matrix's pieces: the algorithm's
configurations (harness/algorithms/, matrix.configs), its parameter sets (params.py: "mixed" has a
frozen parameter and one whose gradient is None now and then; "groups" two groups), crossed with
world sizes, the kind's conditions (base.CONDITIONS) and its variants.

  quick    the defaults and the richest configuration (matrix.representative), float32, the
           default path, every condition the kind supports, every world size
  default  quick, plus every configuration at float32 and float64 under "steps", and config 0 on
           every path (for-loop, foreach, fused where torch has it)
  full     default, plus every condition at float64 and every configuration on every path
The sweeps over configurations, dtypes and paths run under a kind's first variant only (local-sgd:
period 2, no warm-up); the other variants run the quick rows (and float64 at full).
"""
from __future__ import annotations

import zlib

import torch

from optparity.harness import matrix
from optparity.harness.algorithms import spec
from optparity.harness.distributed.base import RELOADS, STEPS, DistCase

_SKIP_OPTIONS = ("differentiable", "capturable")  # graph / CUDA-graph modes, not sharding matters


def _usable(config: dict) -> bool:
    return not any(config.get(k) for k in _SKIP_OPTIONS)


def _param_set(algo: str, condition: str) -> str | None:
    wanted = "groups" if condition in ("groups", "add_param_group") else "mixed"
    if wanted == "groups" and not _takes_groups(algo):
        return None
    sets = matrix.param_sets_for(algo, (wanted,))
    return sets[0] if sets else None


def _takes_groups(algo: str) -> bool:
    from optparity.harness.levels import takes_param_groups

    return takes_param_groups(algo)


def build_cases(driver, algo: str, level: str, world_sizes, backend: str, *, dtypes=None, paths=None,
                param_sets=None, steps: int | None = None, conditions=None) -> list[DistCase]:
    """The cases of `algo` under `driver` at `level` (see the module docstring); `conditions`: the
    candidate's (Driver.conditions_for), default the kind's."""
    if spec(algo).kind == "closure":
        return []  # a step of a closure optimizer is a whole inner optimisation: not a sharding matter
    cfgs = matrix.configs(algo)
    usable = [i for i, c in enumerate(cfgs) if _usable(c)]
    rep = [i for i in matrix.representative(algo) if i in usable] or usable[:1]
    rows = []  # (condition, config indices, paths, dtypes, every variant?)
    f32, f64 = (torch.float32,), (torch.float64,)
    for condition in (conditions or driver.conditions):
        if condition == "steps":
            rows.append((condition, rep, ("default",), f32, True))
            if level != "quick":
                # the sweep of the wrapped algorithm's configurations, dtypes and paths: under the
                # first variant only (a variant is the wrapper's own setting, e.g. the averaging period)
                rows.append((condition, usable, ("default",), f32 + f64, False))
                rows.append((condition, usable[:1] if level == "default" else usable, matrix.PATHS, f32, False))
        else:
            rows.append((condition, rep, ("default",), f32 + (f64 if level == "full" else ()), True))
    cases, seen = [], set()
    for ws in world_sizes:
        for number, variant in enumerate(driver.variants(level)):
            for condition, indices, row_paths, row_dtypes, every_variant in rows:
                if number > 0 and not every_variant:
                    continue
                if condition in ("reload_down", "reload_up") and ws < 2:
                    continue
                pset = _param_set(algo, condition)
                if pset is None or (param_sets and pset not in param_sets and condition != "few_params"):
                    continue
                for index in indices:
                    for path in row_paths:
                        if paths and path not in paths:
                            continue
                        for dtype in (dtypes or row_dtypes):
                            if not matrix._runs(algo, path, dtype):
                                continue
                            case = DistCase(algo, cfgs[index], path, dtype, pset, steps=steps or STEPS,
                                            config_index=index, second_group=spec(algo).second_group,
                                            kind=driver.kind, world_size=ws, condition=condition,
                                            backend=backend, variant=dict(variant))
                            if case.id in seen:
                                continue
                            seen.add(case.id)
                            case.seed = zlib.crc32(case.id.encode())
                            cases.append(case)
    return cases


__all__ = ["build_cases", "RELOADS"]
