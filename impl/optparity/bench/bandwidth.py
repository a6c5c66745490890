"""The practical roofline: bytes an optimizer step must move, and what a plain copy achieves.

An element-wise optimizer step is memory bound. Its floor is one read of every tensor it uses and
one write of every tensor it updates, once each; a perfectly fused kernel moves exactly that, and
cannot move it faster than `dst.copy_(src)` streams bytes on the same machine. Achieved GB/s is
therefore reported as (these bytes / step time) / (copy bandwidth measured in the same run).
"""
from __future__ import annotations

import torch
from torch.utils.benchmark import Timer

def _traffic() -> dict[str, dict[str, str]]:
    from optparity.harness.algorithms import SPECS

    return {name: s.traffic for name, s in SPECS.items() if s.bench}


# Tensors each algorithm touches per element and step with its default hyperparameters
# (no weight decay, momentum, centering or amsgrad): r = read, rw = read and written.
# Each algorithm's description (harness/algorithms/<algo>.py) gives its own.
TRAFFIC = _traffic()

COPY_ELEMENTS = 1 << 24  # 64 MiB per fp32 tensor: far beyond the last-level cache


def accesses_per_element(algorithm: str) -> int:
    if algorithm not in TRAFFIC:
        raise ValueError(f"no traffic model for {algorithm!r}")
    return sum(len(mode) for mode in TRAFFIC[algorithm].values())


def bytes_per_element(algorithm: str, dtype: torch.dtype) -> int:
    """Minimum bytes moved per parameter element per step; state has the parameter's dtype.
    E.g. Adam float32: 7 accesses x 4 bytes = 28."""
    return accesses_per_element(algorithm) * torch.empty((), dtype=dtype).element_size()


def traffic_table(dtypes: dict[str, torch.dtype]) -> list[dict]:
    """One row per algorithm: which tensors are read/written and the bytes per element per dtype."""
    rows = []
    for algo, tensors in TRAFFIC.items():
        row = {"algorithm": algo,
               "tensors (r = read, rw = read+write)": ", ".join(f"{k} {v}" for k, v in tensors.items()),
               "accesses/element": accesses_per_element(algo)}
        for name, dtype in dtypes.items():
            row[f"bytes/element/step {name}"] = bytes_per_element(algo, dtype)
        rows.append(row)
    return rows


def copy_timer(device: str = "cpu", threads: int = 1, numel: int = COPY_ELEMENTS) -> tuple[Timer, int]:
    """A Timer for dst.copy_(src) on fp32 tensors and the bytes one copy moves (read + write)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    timer = Timer("dst.copy_(src)", globals={"dst": dst, "src": src}, num_threads=threads,
                  label="copy_", sub_label=f"{numel} float32", description="torch")
    return timer, 2 * src.numel() * src.element_size()
