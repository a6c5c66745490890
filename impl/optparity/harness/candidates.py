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

from optparity.harness import algorithms, objectives
from optparity.harness.params import ParamSet


class NotApplicable(Exception):
    """The candidate cannot express this case (e.g. an option its signature lacks)."""

    def __init__(self, message: str, options=()):
        super().__init__(message)
        self.options = tuple(options)  # the options it does not accept


# Options that choose a path or a mode rather than the math; never varied by the generic matrix.
_MODE_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def options_not_accepted(obj: Any, kind: str, hyper: dict) -> list[str]:
    """Options of `hyper` that an optimizer class's signature cannot take (none when it has **kwargs)."""
    if kind not in ("optimizer", "functional_class") or not inspect.isclass(obj):
        return []
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in hyper if k not in params]


def load_object(spec: str) -> Any:
    """'package.module:Attr' or 'package.module.Attr' -> the object, with an error that names
    what is missing."""
    if ":" not in spec:
        if "." not in spec:
            raise ValueError(f"expected MODULE:NAME or package.module.Name, got {spec!r}")
        module_name, _, attr = spec.rpartition(".")
        spec = f"{module_name}:{attr}"
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing
        raise ValueError(f"importing module {module_name!r} of {spec!r} raised {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part) and inspect.ismodule(obj):
            try:  # a submodule not imported by its package
                importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                pass
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.ismodule(obj):
        raise ValueError(f"{spec!r} names a module, not an optimizer: expected MODULE:NAME or package.module.Name")
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
        _check_kernel(obj)
        return "kernel"
    raise TypeError(f"{obj!r} is neither an optimizer class nor a functional kernel")


def _check_kernel(fn: Any) -> None:
    """A functional kernel takes the parameters, their gradients and their state (adam(params,
    grads, exp_avgs, ...)): a callable of fewer than two parameters (math.sqrt, print) is not one."""
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(f"{name} is not an optimizer: its signature cannot be read, and an optimizer is a class "
                        f"with step() or a functional kernel taking (params, grads, ...)") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in positional):
        raise TypeError(f"{name} is not an optimizer: expected a class with step() or a functional kernel taking "
                        f"(params, grads, ...), got a callable of {len(positional)} positional parameter(s)")


def algorithm_of(obj: Any) -> str | None:
    """The algorithm an object's name says, else (a class) the first torch.optim or optparity
    class it derives from: `class MyAdamW(torch.optim.AdamW)` is AdamW."""
    found = algorithms.canonical_name(getattr(obj, "__name__", ""))
    if found is None and inspect.isclass(obj):
        for base in obj.__mro__[1:]:
            if base.__module__.startswith(("torch.optim", "optparity.optim")):
                found = algorithms.canonical_name(base.__name__)
                if found is not None:
                    break
    return found


def class_for_kernel(kernel, algo: str) -> type:
    """optparity's class for `algo`, with its math replaced by `kernel`."""
    base = algorithms.optparity_class(algo)
    return type(f"{base.__name__}[{getattr(kernel, '__qualname__', 'kernel')}]", (base,),
                {"kernel": staticmethod(kernel)})


def private_copy(obj: Any, memo: dict | None = None) -> Any:
    """copy.deepcopy for state dicts, several times faster: plain tensors are cloned (torch's
    Tensor.__deepcopy__ costs tens of microseconds each), containers rebuilt, aliasing kept.
    Anything else (Parameters, tensors needing grad, custom objects) goes through deepcopy."""
    memo = {} if memo is None else memo
    key = id(obj)
    if key in memo:
        return memo[key]
    if type(obj) is Tensor and not obj.requires_grad and not obj.__dict__:
        out = obj.clone()
    elif type(obj) is dict:
        out = {k: private_copy(v, memo) for k, v in obj.items()}
    elif type(obj) is list:
        out = [private_copy(v, memo) for v in obj]
    elif type(obj) is tuple:
        out = tuple(private_copy(v, memo) for v in obj)
    elif obj is None or type(obj) in (int, float, bool, str, complex):
        return obj
    else:
        out = copy.deepcopy(obj, memo)
    memo[key] = out
    return out


def _params_for(pset: ParamSet, indices: list[int]) -> list[Tensor]:
    return [pset.params[i] for i in indices]


class OptimizerDriver:
    """A torch.optim-style optimizer over one ParamSet."""

    supports_state_dict = True
    supports_param_groups = True  # lr can be changed between steps; step(closure) returns the loss
    closure_objective = None  # closure-only algorithms: every step is step(closure) on it (objectives.py)

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
        if self.closure_objective is not None:
            return self.closure_objective.step(self.opt, step)

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
            if "lr" in group:  # an optimizer without an lr has nothing to schedule
                group["lr"] = group["lr"] * factor

    def state(self) -> dict[int, dict]:
        return {i: self.opt.state[p] for i, p in enumerate(self.pset.params) if p in self.opt.state}

    def state_dict(self) -> dict:
        return private_copy(self.opt.state_dict())

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
                raise NotApplicable(f"{cls.__name__} takes no {', '.join(missing)}", missing)
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
        return objectives.attach(OptimizerDriver(obj, pset, hyper), algo)
    if kind == "functional_class":
        return FunctionalClassDriver(obj, pset, hyper)
    if kind == "kernel":
        if algo is None:
            raise ValueError(f"cannot tell which algorithm kernel {obj!r} implements; name the reference")
        return objectives.attach(OptimizerDriver(class_for_kernel(obj, algo), pset, hyper), algo)
    raise ValueError(f"unknown candidate kind {kind!r}")


# --- the generic matrix: an algorithm torch.optim does not have, against the reference the user names

GENERIC_PARAM_SETS = ("mixed", "groups")


def _accepted(cls: type) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls).parameters)
    params.pop("params", None)
    return {k: p for k, p in params.items()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _scaled(value):
    """A different, still sensible value: half of it (betas stay below 1); a zero becomes 0.01."""
    if isinstance(value, tuple):
        return tuple(_scaled(v) for v in value)
    return value * 0.5 if value else 0.01


def _is_float_like(value) -> bool:
    if isinstance(value, tuple):
        return bool(value) and all(_is_float_like(v) for v in value)
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool) and value == 0)


def generic_configs(candidate: type, reference: type, hyper: dict | None = None) -> list[dict]:
    """Configurations from the hyperparameters both signatures accept: the defaults, then each float
    hyperparameter scaled (see _scaled), then each bool flipped. Options choosing a path or a mode
    (foreach, fused, capturable, differentiable) are never varied. `hyper` pins values (and gives
    the base value of a hyperparameter the reference requires)."""
    hyper = hyper or {}
    ref, cand = _accepted(reference), _accepted(candidate)
    shared = [k for k in ref if k in cand and k not in _MODE_OPTIONS]
    base = {}
    for name in shared:
        if name in hyper:
            base[name] = hyper[name]
        elif ref[name].default is not inspect.Parameter.empty:
            base[name] = ref[name].default
        else:
            raise ValueError(f"{reference.__qualname__} requires {name!r}: pin it (hyper={{'{name}': ...}}, "
                             f"or --hyper {name}=VALUE)")
    configs = [{}]
    for name in shared:
        value = base[name]
        if isinstance(value, bool):
            configs.append({name: not value})
        elif _is_float_like(value):
            configs.append({name: _scaled(value)})
    return configs


def generic_cases(candidate: type, reference: type, paths=("default",), dtypes=(torch.float32, torch.float64),
                  param_sets=GENERIC_PARAM_SETS, steps: int | None = None, hyper: dict | None = None) -> list:
    """The case matrix for an algorithm torch.optim lacks: generic_configs() over the given paths
    (forloop/foreach only where both classes take foreach, fused where both take fused), dtypes and
    param sets; the second group of "groups" halves lr when both take one."""
    import zlib

    from optparity.harness import matrix

    if not (inspect.isclass(candidate) and inspect.isclass(reference)):
        raise ValueError("a candidate of an algorithm torch.optim lacks must be an optimizer class, "
                         "and so must its reference")
    ref, cand = _accepted(reference), _accepted(candidate)
    both = {k for k in ref if k in cand}
    usable = {"default"} | ({"forloop", "foreach"} if "foreach" in both else set()) | (
        {"fused"} if "fused" in both else set())
    configs = generic_configs(candidate, reference, hyper)
    base_lr = (hyper or {}).get("lr", ref["lr"].default if "lr" in ref else None)
    second = {"lr": _scaled(base_lr)} if "lr" in both and isinstance(base_lr, float) else {}
    name = reference.__name__
    cases = []
    for index, config in enumerate(configs):
        for path in [p for p in paths if p in usable]:
            for dtype in dtypes:
                for pset in param_sets:
                    kwargs = {} if steps is None else {"steps": steps}
                    case = matrix.Case(name, config, path, dtype, pset, config_index=index,
                                       second_group=second, **kwargs)
                    case.seed = zlib.crc32(case.id.encode())
                    cases.append(case)
    return cases
