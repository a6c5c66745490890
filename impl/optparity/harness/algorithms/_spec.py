"""What the harness, the bench and the mutants know about one algorithm: its description.

Every algorithm is one file in this package defining `SPEC = Algorithm(...)`; nothing else in the
tree lists algorithms, so adding one means its functional module, its optim module and that file.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    """A planted bug: one snippet of an optparity module's source rewritten (it must occur exactly
    once). Kinds: numerics (mathematically equal, bitwise different), option (shows only when the
    option `shows_under` is on), logic (a plain bug), or an edge-condition axis name (shows only
    under that condition of the matrix, see harness/mutants.py)."""

    name: str
    algorithm: str  # the torch.optim class it is checked against
    module: str  # "functional.<algo>" or "optim.<algo>" under optparity
    old: str
    new: str
    kind: str
    shows_under: str = ""  # for kind "option": the option that exposes it
    kernel: str = ""  # functional mutants: the kernel function to run (default: the algorithm's, lower-case)
    kernel_kwargs: tuple = ()  # fixed keyword arguments for that kernel, as (name, value) pairs

    def source(self) -> str:
        original = inspect.getsource(importlib.import_module(f"optparity.{self.module}"))
        count = original.count(self.old)
        if count != 1:
            raise ValueError(f"mutant {self.name}: snippet occurs {count} times in optparity.{self.module}, "
                             f"expected exactly once: {self.old!r}")
        return original.replace(self.old, self.new)

    def build(self):
        """The mutated candidate: an optimizer class (optim mutants) or a kernel (functional ones)."""
        from optparity.harness.candidates import class_for_kernel

        module = types.ModuleType(f"optparity_mutant_{self.name}")
        module.__dict__["__name__"] = module.__name__
        exec(compile(self.source(), f"<mutant {self.name}>", "exec"), module.__dict__)  # noqa: S102
        if self.module.startswith("optim."):
            return getattr(module, self.algorithm)
        fn = getattr(module, self.kernel or self.algorithm.lower())
        if self.kernel_kwargs:
            fn = functools.partial(fn, **dict(self.kernel_kwargs))
        return class_for_kernel(fn, self.algorithm)


@dataclass(frozen=True)
class Algorithm:
    name: str  # torch.optim's class name; optparity.optim.<name>, optparity.functional.<name.lower()>
    torch_configs: tuple[dict, ...]  # every CPU config of torch's own tests (tests/test_matrix.py proves it)
    extra_configs: tuple[dict, ...] = ()  # ours: options torch's list leaves out, tensor hyperparameters
    cuda_configs: tuple[dict, ...] = ()  # torch's tests' CUDA-only configs (capturable=True); on CUDA only
    second_group: dict = field(default_factory=dict)  # overrides of the second group in "groups" sets
    # Per parameter element and step: which tensors are read ("r") or read and written ("rw").
    traffic: dict = field(default_factory=dict)
    fused_on_cpu: bool = False  # torch ships a fused kernel that runs on CPU
    foreach: bool = True  # has a foreach path (foreach=True accepted)
    fused_on_cuda: bool = False
    # How the optimizer is fed: "dense" gradients, "sparse" gradients only (SparseAdam),
    # "closure" (LBFGS: every step is step(closure)), "matrix" (Muon: 2-D parameters only).
    kind: str = "dense"
    complex: bool = True  # accepts complex parameters
    low_precision: bool = True  # float16 / bfloat16 parameters are supported on CPU
    sparse_grads: bool = False  # also accepts sparse gradients (SGD, Adagrad)
    functional_upstream: bool = False  # torch.distributed.optim has a _Functional<name>
    bench: bool = True  # benchmarked by `optparity bench` / asv
    # steps per case when none is asked for (None: matrix.STEPS); more than matrix.CROSS_LOAD, so
    # every reload and the lr change still happen with steps to follow
    steps: int | None = None
    mutants: tuple[Mutant, ...] = ()

    def configs(self) -> list[dict]:
        return list(self.torch_configs) + list(self.extra_configs)

    def torch_class(self) -> type:
        import torch

        return getattr(torch.optim, self.name)

    def optparity_class(self) -> type:
        return getattr(importlib.import_module(f"optparity.optim.{self.name.lower()}"), self.name)

    def optparity_kernel(self):
        return getattr(importlib.import_module(f"optparity.functional.{self.name.lower()}"), self.name.lower())
