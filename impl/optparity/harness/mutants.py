"""Planted bugs: single edits to correct optimizers that the harness must catch.

Each mutant rewrites one snippet of an optparity module's source (the snippet must occur
exactly once), executes the result as a fresh module, and checks the mutated optimizer
against torch.optim. A harness that lets one through has lost its teeth. Kinds:
  numerics — mathematically equal to the original, bitwise different
  option   — only shows when one option is on (named in `shows_under`)
  logic    — a plain bug
"""
from __future__ import annotations

from optparity.harness.algorithms import SPECS, Mutant

# Each algorithm's planted bugs live in its description (harness/algorithms/<algo>.py).
MUTANTS: tuple[Mutant, ...] = tuple(m for s in SPECS.values() for m in s.mutants)


def by_name(name: str) -> Mutant:
    for m in MUTANTS:
        if m.name == name:
            return m
    raise KeyError(f"no mutant named {name!r}; known: {', '.join(m.name for m in MUTANTS)}")
