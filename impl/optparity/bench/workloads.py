"""What gets benchmarked: workloads (parameter shapes), implementations and optimizer builders.

Shared by `optparity bench` and the asv suite in suites/benchmarks. The asv suite loads this file
by path from the working tree, so that asv can benchmark commits older than optparity.bench:
keep its imports to torch and the standard library (optparity.optim is imported lazily).
"""
from __future__ import annotations

import ctypes
import importlib
import sys
from dataclasses import dataclass

import torch

try:  # the algorithm descriptions (harness/algorithms/<algo>.py) say which are benchmarked
    from optparity.harness.algorithms import SPECS as _SPECS

    ALGORITHMS = tuple(name for name, s in _SPECS.items() if s.bench)
    FUSED_ON_CPU = frozenset(name for name in ALGORITHMS if _SPECS[name].fused_on_cpu)
except ImportError:  # an old commit under asv, before the descriptions existed
    ALGORITHMS = ("Adadelta", "Adagrad", "Adam", "AdamW", "Adamax", "RMSprop", "Rprop", "SGD")
    FUSED_ON_CPU = frozenset({"Adam", "AdamW", "SGD", "Adagrad"})

# <library>-<path>: the path names match the conformance matrix (forloop = foreach=False).
IMPLS = ("optparity-forloop", "optparity-foreach", "torch-forloop", "torch-foreach", "torch-fused")
_PATH_KWARGS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Unsupported(NotImplementedError):
    """This combination does not exist (e.g. a fused Rprop). A NotImplementedError, so an asv
    setup() that lets it escape makes asv skip the benchmark instead of failing it."""


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def transformer_shapes(d_model: int = 256, d_ff: int = 1024, n_blocks: int = 8) -> tuple[tuple[int, ...], ...]:
    """Pre-LN transformer blocks with separate q/k/v projections (Llama/BERT layout): per block
    two LayerNorms, four d x d attention projections and a d -> d_ff -> d MLP, each with a bias."""
    block = [
        (d_model,), (d_model,),                          # ln1 weight, bias
        (d_model, d_model), (d_model,),                  # q
        (d_model, d_model), (d_model,),                  # k
        (d_model, d_model), (d_model,),                  # v
        (d_model, d_model), (d_model,),                  # out projection
        (d_model,), (d_model,),                          # ln2 weight, bias
        (d_ff, d_model), (d_ff,),                        # mlp up
        (d_model, d_ff), (d_model,),                     # mlp down
    ]
    return tuple(block * n_blocks)


WORKLOADS = {
    "1M": Workload("1M", ((1 << 20,),), "one tensor of 2^20 elements"),
    "16M": Workload("16M", ((1 << 24,),), "one tensor of 2^24 elements (beyond the caches)"),
    "transformer": Workload("transformer", transformer_shapes(),
                            "8 transformer blocks, d_model 256, d_ff 1024: 128 tensors, half of them <= 1024 elements"),
}


def parse_impl(impl: str) -> tuple[str, str]:
    """'torch-fused' -> ('torch', 'fused'), with a clear error for anything else."""
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; expected one of {', '.join(IMPLS)}")
    library, path = impl.split("-")
    return library, path


def supported(algorithm: str, impl: str, device: str = "cpu") -> bool:
    _, path = parse_impl(impl)
    return path != "fused" or device != "cpu" or algorithm in FUSED_ON_CPU


def make_params(workload: Workload, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> list[torch.Tensor]:
    """Leaf tensors with a fixed random gradient each (values drawn in fp32 so both dtypes see the
    same numbers). The gradient stays the same every step: the timing does not depend on it."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in workload.shapes:
        p = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


def optimizer_class(algorithm: str, library: str) -> type:
    module = importlib.import_module("optparity.optim" if library == "optparity" else "torch.optim")
    try:
        return getattr(module, algorithm)
    except AttributeError:
        # An older optparity commit (asv history) that did not have this algorithm yet.
        raise Unsupported(f"{module.__name__} has no {algorithm}") from None


def build_optimizer(algorithm: str, impl: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer with default hyperparameters on the requested path."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    library, path = parse_impl(impl)
    device = params[0].device.type if params else "cpu"
    if not supported(algorithm, impl, device):
        raise Unsupported(f"torch has no fused {algorithm} on {device}")
    return optimizer_class(algorithm, library)(params, **_PATH_KWARGS[path])


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer.state (every tensor, including the `step` counters)."""
    total = 0
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def prepared(algorithm: str, impl: str, workload: str, dtype: str, device: str = "cpu",
             warmup_steps: int = 2) -> torch.optim.Optimizer:
    """A ready optimizer in steady state: state allocated by `warmup_steps` steps."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if not supported(algorithm, impl, device):
        raise Unsupported(f"torch has no fused {algorithm} on {device}")
    params = make_params(WORKLOADS[workload], DTYPES[dtype], device)
    try:
        opt = build_optimizer(algorithm, impl, params)
        for _ in range(warmup_steps):
            opt.step()
    except RuntimeError as e:
        if impl == "torch-fused" and device != "cpu":  # FUSED_ON_CPU is only known to hold for CPU
            raise Unsupported(f"torch has no fused {algorithm} on {device}: {e}") from None
        raise
    return opt


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def steady_allocator() -> str:
    """Make glibc malloc keep freed memory instead of handing it back to the kernel.

    By default glibc mmaps large blocks and trims its heap on free, with thresholds that move with
    the process's history. A step's temporaries (foreach paths allocate one per parameter) are
    then either reused or page-faulted in afresh every step, depending on what ran before in the
    same process: the same step measured 5 ms or 9 ms (Rprop foreach, 1M) and 8.6 or 17.6 ms
    (Adamax foreach, transformer), for optparity and torch alike. Fixed thresholds make every
    measurement take the reuse path. Returns what was done, for the run's metadata."""
    if not sys.platform.startswith("linux"):
        return "system default (not glibc)"
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system default (not glibc)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if mallopt(_M_MMAP_THRESHOLD, 1 << 30) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1):
        return "glibc with mallopt M_MMAP_THRESHOLD=1 GiB, M_TRIM_THRESHOLD=2 GiB (freed memory is reused)"
    return "system default (mallopt refused the thresholds)"
