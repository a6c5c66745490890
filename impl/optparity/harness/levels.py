"""Named levels of the check: which of the matrix's cases `optparity check --level` runs.

A level is a selection over the cases matrix.build_cases makes, so new axes slot in by their
tags. Cases are read through two attributes (missing ones mean the ordinary matrix):
  * `axis`: "base" for the hyperparameter x path x dtype x parameter-set matrix, otherwise the
    edge condition the case builds (sizes, values, lengths, ...);
  * `cost`: "cheap", or "expensive" for the cases only the full level runs (long runs, huge tensors).

  quick    a pull-request gate: every configuration on every path, float32, the "groups"
           parameter set (two groups with different hyperparameters), plus the first case of each
           edge axis of each algorithm.
  default  the ordinary matrix (float32 and float64, every parameter set) plus every cheap edge case.
  full     everything: every dtype the algorithm supports (float16 and bfloat16 too) and the
           expensive edge cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from optparity.harness import matrix
from optparity.harness.algorithms import spec

LOW_PRECISION = (torch.float16, torch.bfloat16)


def axis_of(case) -> str:
    return getattr(case, "axis", None) or "base"


def cost_of(case) -> str:
    return getattr(case, "cost", None) or "cheap"


@dataclass(frozen=True)
class Level:
    name: str
    summary: str
    dtypes: tuple  # of the base matrix, unless --dtypes says otherwise
    param_sets: tuple  # of the base matrix, unless --param-sets says otherwise
    edge: Callable[[list], list]  # which edge cases (axis != "base") of one algorithm it keeps


def _first_per_axis(cases: list) -> list:
    """The first cheap case of each axis (the first case when the axis has no cheap one)."""
    chosen: dict[str, object] = {}
    for c in cases:
        axis = axis_of(c)
        if axis not in chosen or (cost_of(chosen[axis]) == "expensive" and cost_of(c) != "expensive"):
            chosen[axis] = c
    return list(chosen.values())


LEVELS: dict[str, Level] = {
    "quick": Level("quick", "every configuration and path, float32, groups parameter set; one case per edge axis",
                   (torch.float32,), ("groups",), _first_per_axis),
    "default": Level("default", "the matrix (float32, float64, every parameter set) and the cheap edge cases",
                     matrix.DTYPES, matrix.PARAM_SETS, lambda cases: [c for c in cases if cost_of(c) != "expensive"]),
    "full": Level("full", "every dtype, every parameter set, every edge case including long runs",
                  matrix.DTYPES + LOW_PRECISION, matrix.PARAM_SETS, lambda cases: list(cases)),
}


def level(name: str) -> Level:
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown --level {name!r}; known: {', '.join(LEVELS)}") from None


def select(name: str, algorithm: str, *, paths=None, dtypes=None, param_sets=None, steps=None) -> list:
    """The cases of `algorithm` at level `name`; paths / dtypes / param_sets / steps given
    explicitly narrow or replace the level's own choice."""
    lv = level(name)
    if dtypes is None:
        dtypes = lv.dtypes if spec(algorithm).low_precision else tuple(d for d in lv.dtypes if d not in LOW_PRECISION)
    cases = matrix.build_cases([algorithm], tuple(paths or matrix.PATHS), tuple(dtypes),
                               tuple(param_sets or lv.param_sets), steps or matrix.STEPS)
    kept = {id(c) for c in lv.edge([c for c in cases if axis_of(c) != "base"])}
    return [c for c in cases if axis_of(c) == "base" or id(c) in kept]
