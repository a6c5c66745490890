"""Which torch optparity runs against, and which torch its own implementations mirror.

A check always compares a candidate with the *installed* torch (its torch.optim, its
torch.distributed.optim, its test configurations): the question a user asks is about the torch they
run. optparity's own reference implementations (optparity.functional / .optim / .distributed) were
written op for op from one release's sources, MIRRORS_TORCH; on another release a difference between
them and torch.optim is upstream's math moving, reported as version drift (report.version_drift_line),
never as a pass and never as a crash.
"""
from __future__ import annotations

import re

import torch

# The torch release whose sources optparity's implementations follow, op for op.
MIRRORS_TORCH = "2.13"
# The releases optparity supports (pyproject: torch>=2.11,<2.16), oldest and newest.
SUPPORTED = ("2.11", "2.15")


def release(version: str | None = None) -> str:
    """"2.15" for "2.15.0+cu130" (the installed torch when no version is given)."""
    text = version if version is not None else torch.__version__
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"not a torch version: {text!r}")
    return f"{int(match[1])}.{int(match[2])}"


def as_tuple(rel: str) -> tuple[int, int]:
    major, minor = release(rel).split(".")
    return int(major), int(minor)


def at_least(rel: str) -> bool:
    """The installed torch is release `rel` or newer (for code that follows upstream's changes)."""
    return as_tuple(release()) >= as_tuple(rel)


def mirrors_installed() -> bool:
    """optparity's implementations follow the installed release's sources."""
    return release() == MIRRORS_TORCH


def supported() -> bool:
    return as_tuple(SUPPORTED[0]) <= as_tuple(release()) <= as_tuple(SUPPORTED[1])


def compared_against() -> str:
    """One line for every report: the torch a check compares against, and what optparity mirrors."""
    line = f"torch {torch.__version__} (installed)"
    cuda = getattr(torch.version, "cuda", None)
    if cuda:
        line += f", CUDA {cuda}"
    line += f"; optparity's implementations mirror torch {MIRRORS_TORCH}"
    if not supported():
        line += f"; this torch is outside the supported {SUPPORTED[0]} to {SUPPORTED[1]}"
    return line


def info() -> dict:
    """The same, as data (JSON reports, JUnit properties, HTML)."""
    return {"torch": torch.__version__, "torch_release": release(), "cuda": getattr(torch.version, "cuda", None),
            "optparity_mirrors_torch": MIRRORS_TORCH, "mirrors_installed": mirrors_installed(),
            "supported": supported(), "supported_range": list(SUPPORTED)}


def is_optparity_subject(label: str) -> bool:
    """A candidate that is one of optparity's own implementations (whose math mirrors MIRRORS_TORCH)."""
    return label.startswith("optparity.")
