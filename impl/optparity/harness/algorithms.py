"""The eight algorithms optparity covers, and how to find each one's torch and optparity forms."""
from __future__ import annotations

import importlib

import torch

ALGORITHMS = ("Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "RMSprop", "Rprop", "SGD")
# torch ships a fused kernel usable on CPU for these.
FUSED_ON_CPU = frozenset({"Adam", "AdamW", "SGD", "Adagrad"})


def canonical_name(name: str) -> str | None:
    """'adamw', 'AdamW', 'FunctionalAdamW', '_fused_adamw' -> 'AdamW'; None if unknown."""
    key = name.lower()
    for prefix in ("_functional", "functional", "_single_tensor_", "_multi_tensor_", "_fused_"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    for algo in ALGORITHMS:
        if algo.lower() == key:
            return algo
    return None


def torch_class(algo: str) -> type:
    return getattr(torch.optim, algo)


def optparity_class(algo: str) -> type:
    return getattr(importlib.import_module(f"optparity.optim.{algo.lower()}"), algo)


def optparity_kernel(algo: str):
    return getattr(importlib.import_module(f"optparity.functional.{algo.lower()}"), algo.lower())
