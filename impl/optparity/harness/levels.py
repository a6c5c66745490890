"""Named levels of the check: which of the matrix's cases `optparity check --level` runs.

A level is a selection over the cases matrix.build_cases makes, so new axes slot in by their
tags. Cases are read through two attributes (missing ones mean the ordinary matrix):
  * `axis`: "base" for the hyperparameter x path x dtype x parameter-set matrix, otherwise the
    edge condition the case builds (sizes, values, lengths, ...);
  * `cost`: "cheap", or "expensive" for the cases only the full level runs (long runs, huge tensors).

  quick    a pull-request gate: every configuration on every path, float32, the "groups"
           parameter set (two groups with different hyperparameters; "mixed" for an algorithm
           that refuses groups) and the sparse-gradient one where it exists, plus the first cheap
           case of each edge axis on each path (so quick < default < full).
  default  the ordinary matrix (float32 and float64, every parameter set) plus every cheap edge case.
  full     everything: every dtype the algorithm supports (float16 and bfloat16 too) and the
           expensive edge cases.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from optparity.harness import matrix
from optparity.harness.algorithms import spec

LOW_PRECISION = (torch.float16, torch.bfloat16)
# --dtypes complex64 / complex128 select the complex parameter set at this real dtype
COMPLEX_WIDTH = {torch.complex64: torch.float32, torch.complex128: torch.float64}
# what --dtypes accepts (check, reference record / check)
DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
               "bfloat16": torch.bfloat16, "complex64": torch.complex64, "complex128": torch.complex128}


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
    """The first cheap case of each axis on each path: fused kernels take their own route
    through most conditions (AMP's found_inf, say)."""
    chosen: dict[tuple, object] = {}
    for c in cases:
        if cost_of(c) != "expensive":
            chosen.setdefault((axis_of(c), c.path), c)
    return list(chosen.values())


@functools.lru_cache(maxsize=None)
def takes_param_groups(algorithm: str) -> bool:
    """Whether torch's class accepts two parameter groups (LBFGS refuses them: its "groups" cases
    only check that the candidate refuses them too, so they cannot stand in for the matrix)."""
    cls = spec(algorithm).torch_class()
    try:
        cls([{"params": [torch.zeros(2, 2, requires_grad=True)]}, {"params": [torch.zeros(2, 2, requires_grad=True)]}])
    except Exception:  # noqa: BLE001 - any refusal means the same
        return False
    return True


LEVELS: dict[str, Level] = {
    "quick": Level("quick", "every configuration and path, float32, the groups (and sparse) parameter set; "
                            "the first cheap case of each edge axis on each path", (torch.float32,), ("groups", "sparse"), _first_per_axis),
    "default": Level("default", "the matrix (float32, float64, every parameter set) and the cheap edge cases",
                     matrix.DTYPES, matrix.PARAM_SETS, lambda cases: [c for c in cases if cost_of(c) != "expensive"]),
    "full": Level("full", "every dtype, every parameter set, every edge case including long runs",
                  matrix.DTYPES + LOW_PRECISION, matrix.PARAM_SETS, lambda cases: list(cases)),
}


def suite_level() -> str:
    """The level optparity's own test suites check at: $OPTPARITY_TEST_LEVEL, default "quick" (the
    CI gate; `OPTPARITY_TEST_LEVEL=default` or `full` for the nightly runs)."""
    import os

    return level(os.environ.get("OPTPARITY_TEST_LEVEL", "quick")).name


def level(name: str) -> Level:
    try:
        return LEVELS[name]
    except KeyError:
        raise ValueError(f"unknown --level {name!r}; known: {', '.join(LEVELS)}") from None


def select(name: str, algorithm: str, *, paths=None, dtypes=None, param_sets=None, steps=None,
           device: str = "cpu", reference_device: str | None = None) -> list:
    """The cases of `algorithm` at level `name`; paths / dtypes / param_sets / steps given
    explicitly narrow or replace the level's own choice. device / reference_device: where the
    candidate and the reference run (matrix.build_cases); the same selection on every device."""
    lv = level(name)
    complex_widths = ()
    asked = None if dtypes is None else tuple(dtypes)
    if dtypes is None:
        dtypes = lv.dtypes if spec(algorithm).low_precision else tuple(d for d in lv.dtypes if d not in LOW_PRECISION)
    elif any(d.is_complex for d in dtypes):
        # complex64 / complex128: the complex parameter set at float32 / float64 (a real dtype
        # given beside them keeps all its sets, the complex one included)
        real = tuple(d for d in dtypes if not d.is_complex)
        complex_widths = tuple(COMPLEX_WIDTH[d] for d in dtypes if d.is_complex)
        dtypes = tuple(dict.fromkeys(real + complex_widths))
    if param_sets is None:
        param_sets = lv.param_sets + (("complex",) if complex_widths and "complex" not in lv.param_sets else ())
        if "groups" in param_sets and not takes_param_groups(algorithm):
            param_sets = tuple("mixed" if p == "groups" else p for p in param_sets)
    cases = matrix.build_cases([algorithm], tuple(paths or matrix.PATHS), tuple(dtypes),
                               tuple(param_sets), steps, device=device,
                               reference_device=reference_device, triples=lv.name == "full")
    edges = [c for c in cases if axis_of(c) != "base"]
    if asked is not None:  # --dtypes filters the edge cases too (they pick their own dtypes otherwise)
        edges = [c for c in edges if _edge_dtype_asked(c, dtypes)]
    kept = {id(c) for c in lv.edge(edges)}
    cases = [c for c in cases if axis_of(c) == "base" or id(c) in kept]
    if complex_widths:
        cases = [c for c in cases if c.dtype in real or (c.param_set == "complex" and c.dtype in complex_widths)]
    return cases


def _edge_dtype_asked(case, dtypes) -> bool:
    """An edge case's dtype is among `dtypes`; the mixed-dtype set's low-precision members (its
    float32 form holds bfloat16 and float16 tensors) only when a low-precision dtype is asked for."""
    if case.dtype not in dtypes:
        return False
    if "+dtype_mix+" in case.param_set:  # a composed mix (harness/covering.py): its second dtype too
        from optparity.harness.params import OTHER_DTYPE

        return OTHER_DTYPE[case.dtype] in dtypes
    if case.param_set == "dtype_mix" and case.dtype == torch.float32 and spec(case.algorithm).low_precision:
        return any(d in LOW_PRECISION for d in dtypes)
    return True
