"""Turn whatever a user hands us into a uniform driver: build on a parameter set, step with
given grads, expose state per parameter, save and reload.

Three kinds of candidate are understood:
  * a torch.optim-style class           — cls(params_or_groups, **hyper); step(); state; state_dict()
  * a functional class                  — cls(params, **hyper); step(gradients)  (torch.distributed.optim)
  * a plain functional kernel           — e.g. adam(params, grads, exp_avgs, ...); it is run inside
    optparity's class for its algorithm with that class's `kernel` swapped for the candidate.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from typing import Any

import torch
from torch import Tensor

from optparity.harness import algorithms
from optparity.harness.params import ParamSet


class NotApplicable(Exception):
    """The candidate cannot express this case (e.g. an option its signature lacks)."""


def load_object(spec: str) -> Any:
    """'package.module:Attr' -> the object, with an error that names what is missing."""
    if ":" not in spec:
        raise ValueError(f"expected MODULE:NAME, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def kind_of(obj: Any) -> str:
    if inspect.isclass(obj):
        if issubclass(obj, torch.optim.Optimizer):
            return "optimizer"
        step = getattr(obj, "step", None)
        if step is not None:
            names = list(inspect.signature(step).parameters)
            if len(names) > 1 and names[1] == "gradients":
                return "functional_class"
            return "optimizer"
        raise TypeError(f"{obj.__qualname__} has no step() method")
    if callable(obj):
        return "kernel"
    raise TypeError(f"{obj!r} is neither an optimizer class nor a functional kernel")


def algorithm_of(obj: Any) -> str | None:
    return algorithms.canonical_name(getattr(obj, "__name__", ""))


def class_for_kernel(kernel, algo: str) -> type:
    """optparity's class for `algo`, with its math replaced by `kernel`."""
    base = algorithms.optparity_class(algo)
    return type(f"{base.__name__}[{getattr(kernel, '__qualname__', 'kernel')}]", (base,),
                {"kernel": staticmethod(kernel)})


def _params_for(pset: ParamSet, indices: list[int]) -> list[Tensor]:
    return [pset.params[i] for i in indices]


class OptimizerDriver:
    """A torch.optim-style optimizer over one ParamSet."""

    supports_state_dict = True
    supports_param_groups = True  # lr can be changed between steps; step(closure) returns the loss

    def __init__(self, cls: type, pset: ParamSet, hyper: dict):
        self.cls, self.pset, self.hyper = cls, pset, hyper
        self.opt = self._build()

    def _build(self):
        groups = [{"params": _params_for(self.pset, idx), **copy.deepcopy(over)} for idx, over in self.pset.groups]
        if self.pset.add_later:
            opt = self.cls([groups[0]], **copy.deepcopy(self.hyper))
            for group in groups[1:]:
                opt.add_param_group(group)
            return opt
        if len(groups) == 1 and not self.pset.groups[0][1]:
            groups = groups[0]["params"]  # plain list, the most common way to call
        return self.cls(groups, **copy.deepcopy(self.hyper))

    def step(self, grads: list[Tensor | None], step: int):
        """Even steps go through a closure (torch's step(closure) contract); its loss is returned."""
        def set_grads():
            for p, g in zip(self.pset.params, grads):
                p.grad = g

        if step % 2:
            set_grads()
            return self.opt.step()
        loss = torch.tensor(float(step))

        def closure():
            set_grads()
            return loss

        return self.opt.step(closure)

    def scale_lr(self, factor: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = group["lr"] * factor

    def state(self) -> dict[int, dict]:
        return {i: self.opt.state[p] for i, p in enumerate(self.pset.params) if p in self.opt.state}

    def state_dict(self) -> dict:
        return copy.deepcopy(self.opt.state_dict())

    def reload(self, state_dict: dict) -> None:
        """Rebuild a fresh optimizer over the same params and load `state_dict` into it.
        The dict must be a private copy (state_dict() makes one): it may be aliased by the load."""
        self.opt = self._build()
        self.opt.load_state_dict(state_dict)


class FunctionalClassDriver:
    """A torch.distributed.optim-style functional class: one instance per parameter group."""

    supports_state_dict = False
    supports_param_groups = False

    def __init__(self, cls: type, pset: ParamSet, hyper: dict):
        accepted = inspect.signature(cls.__init__).parameters
        self.instances = []
        for idx, over in pset.groups:
            kwargs = {**copy.deepcopy(hyper), **copy.deepcopy(over)}
            missing = [k for k in kwargs if k not in accepted]
            if missing:
                raise NotApplicable(f"{cls.__name__} takes no {', '.join(missing)}")
            with warnings.catch_warnings(record=True):
                # torch's Functional* classes force a TorchScript deprecation warning; recording swallows it.
                self.instances.append((idx, cls(_params_for(pset, idx), **kwargs)))
        self.pset = pset

    def step(self, grads: list[Tensor | None], step: int) -> None:
        for idx, inst in self.instances:
            inst.step([grads[i] for i in idx])

    def state(self) -> dict[int, dict]:
        out = {}
        for idx, inst in self.instances:
            for i in idx:
                p = self.pset.params[i]
                if p in inst.state:
                    out[i] = inst.state[p]
        return out


def make_driver(obj: Any, kind: str, algo: str | None, pset: ParamSet, hyper: dict):
    if kind == "optimizer":
        return OptimizerDriver(obj, pset, hyper)
    if kind == "functional_class":
        return FunctionalClassDriver(obj, pset, hyper)
    if kind == "kernel":
        if algo is None:
            raise ValueError(f"cannot tell which algorithm kernel {obj!r} implements; name the reference")
        return OptimizerDriver(class_for_kernel(obj, algo), pset, hyper)
    raise ValueError(f"unknown candidate kind {kind!r}")
