"""Every algorithm optparity knows, one description file each (`<name>.py` here, `SPEC = Algorithm(...)`).

What does the harness know about algorithm X? `harness/algorithms/x.py`: its configurations,
second-group overrides, paths, bytes moved per element, how it is fed, and its planted bugs.
"""
from __future__ import annotations

import importlib
import pkgutil

from optparity.harness.algorithms._spec import Algorithm, Mutant


def _discover() -> dict[str, Algorithm]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        spec = importlib.import_module(f"{__name__}.{info.name}").SPEC
        if spec.name.lower() != info.name:
            raise RuntimeError(f"harness/algorithms/{info.name}.py describes {spec.name}; name the file {spec.name.lower()}.py")
        found[spec.name] = spec
    return dict(sorted(found.items()))


SPECS: dict[str, Algorithm] = _discover()
ALGORITHMS: tuple[str, ...] = tuple(SPECS)
# torch ships a fused kernel usable on CPU for these.
FUSED_ON_CPU = frozenset(name for name, s in SPECS.items() if s.fused_on_cpu)


def spec(name: str) -> Algorithm:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def canonical_name(name: str) -> str | None:
    """'adamw', 'AdamW', 'FunctionalAdamW', '_fused_adamw' -> 'AdamW'; None if unknown."""
    key = name.lower()
    for prefix in ("_functional", "functional", "_single_tensor_", "_multi_tensor_", "_fused_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    for algo in ALGORITHMS:
        if algo.lower() in (key, key.replace("_", "")):  # torch's kernel is sparse_adam
            return algo
    return None


def torch_class(algo: str) -> type:
    return spec(algo).torch_class()


def optparity_class(algo: str) -> type:
    return spec(algo).optparity_class()


def optparity_kernel(algo: str):
    return spec(algo).optparity_kernel()


__all__ = ["Algorithm", "Mutant", "SPECS", "ALGORITHMS", "FUSED_ON_CPU", "spec", "canonical_name",
           "torch_class", "optparity_class", "optparity_kernel"]
