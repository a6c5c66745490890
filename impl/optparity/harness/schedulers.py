"""The scheduler axis: an LR scheduler stepping alongside the optimizer.

A case with `scheduler` set (a recipe name below) gets the same torch.optim.lr_scheduler
recipe built on the candidate and on the reference, stepped after every optimizer step
(ReduceLROnPlateau fed the same deterministic metric). The schedulers are torch's own on both
sides: what is under test is the optimizer's reading of its param groups. Every step the
groups' hyperparameters (lr, initial_lr, and what OneCycleLR cycles: momentum or betas) are
compared too. Scalar and tensor lr (schedulers fill a tensor lr in place) are both covered.

When a driver rebuilds its optimizer from a state dict, the scheduler is rebuilt on the new
optimizer and given the old one's state_dict, the way a training run resumes.
"""
from __future__ import annotations

import zlib

import torch
from torch.optim import lr_scheduler

from optparity.harness.candidates import private_copy


def _one_cycle(opt, steps: int):
    # cycle momentum (SGD, RMSprop) or beta1 (Adam) where the optimizer has them
    cycles = "momentum" in opt.defaults or "betas" in opt.defaults
    max_lr = 2.0 * float(opt.param_groups[0]["lr"])
    return lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=steps, cycle_momentum=cycles)


def _sequential(opt, steps: int):
    warmup = lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=4)
    decay = lr_scheduler.ExponentialLR(opt, gamma=0.8)
    return lr_scheduler.SequentialLR(opt, [warmup, decay], milestones=[4])


# name -> builder(optimizer, case steps)
RECIPES = {
    "StepLR": lambda opt, steps: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "OneCycleLR": _one_cycle,
    "ReduceLROnPlateau": lambda opt, steps: lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=1),
    "SequentialLR": _sequential,
}


def metric(step: int) -> float:
    """ReduceLROnPlateau's metric after `step`: improves every third step, so the plateaus
    (patience 1) cut the lr several times within a run."""
    return 1.0 / (1 + step // 3)


# The algorithms scheduled and the configuration each runs under: one whose cycled options are
# on already (OneCycleLR turning momentum on would otherwise make a momentum-only bug show in a
# case whose config says momentum is off). Each is run with its scalar lr and as a tensor.
SCHEDULED = {
    "SGD": {"momentum": 0.9},
    "Adam": {},
    "RMSprop": {"momentum": 0.5, "alpha": 0.9},
    "LBFGS": {"history_size": 2},
}
_DEFAULT_LR = {"SGD": 1e-3, "Adam": 1e-3, "RMSprop": 1e-2, "LBFGS": 1.0}


def scheduler_cases(algo: str, paths, dtypes, steps: int) -> list:
    """The scheduler cases of `algo` (none unless it is in SCHEDULED): every recipe, with scalar
    and tensor lr, on the one-group "mixed" set, at the first of `dtypes` that is float32 or
    float64, on its for-loop path (the default path when it has no foreach flag)."""
    from optparity.harness import matrix  # matrix calls this while building its cases

    if algo not in SCHEDULED:
        return []
    s = matrix.spec(algo)
    path = "forloop" if s.foreach else "default"
    dtype = next((d for d in dtypes if d in (torch.float32, torch.float64)), None)
    if path not in paths or dtype is None or not matrix._runs(algo, path, dtype):
        return []
    base = SCHEDULED[algo]
    index = next((i for i, c in enumerate(matrix.configs(algo)) if matrix.same_config(c, base)), None)
    if index is None:
        raise RuntimeError(f"{algo}'s scheduled configuration {base} is not among its configs")
    lr = float(base.get("lr", _DEFAULT_LR[algo]))
    cases = []
    for name in RECIPES:
        for lr_value in (lr, torch.tensor(lr)):
            case = matrix.Case(algo, {**base, "lr": lr_value}, path, dtype, "mixed", steps=steps,
                               config_index=index, second_group=s.second_group, axis="scheduler",
                               scheduler=name)
            case.seed = zlib.crc32(case.id.encode())
            cases.append(case)
    return cases


class _Scheduled:
    """Wraps one driver's step and reload so that a scheduler follows its optimizer."""

    def __init__(self, name: str, driver, steps: int):
        self.build = lambda opt: RECIPES[name](opt, steps)
        self.plateau = name == "ReduceLROnPlateau"
        self.driver, self.scheduler = driver, None
        self.inner_step, self.inner_reload = driver.step, driver.reload
        driver.step, driver.reload = self.step, self.reload

    def step(self, grads, step: int):
        if self.scheduler is None:  # built lazily: a refusal is then compared as a step error
            self.scheduler = self.build(self.driver.opt)
        out = self.inner_step(grads, step)
        if self.plateau:
            self.scheduler.step(metric(step))
        else:
            self.scheduler.step()
        return out

    def reload(self, state_dict: dict) -> None:
        private = private_copy(state_dict)  # the load may alias the dict it is given
        saved = self.scheduler.state_dict() if self.scheduler is not None else None
        self.inner_reload(state_dict)
        if saved is not None:
            # a scheduler's constructor rewrites lr (and OneCycleLR's keys): load the groups again
            self.scheduler = self.build(self.driver.opt)
            self.driver.opt.load_state_dict(private)
            self.scheduler.load_state_dict(saved)


def attach(case, *drivers) -> None:
    """Make each torch.optim-style driver step `case.scheduler` after its optimizer."""
    name = getattr(case, "scheduler", None)
    if not name:
        return
    if name not in RECIPES:
        raise ValueError(f"unknown scheduler recipe {name!r}; known: {', '.join(RECIPES)}")
    for driver in drivers:
        if driver is not None and getattr(driver, "opt", None) is not None:
            _Scheduled(name, driver, case.steps)


def live_param_groups(cand, ref) -> tuple[dict, dict]:
    """Both optimizers' param groups now, without the params, shaped like state dicts."""
    def groups(driver):
        return {"param_groups": [{k: v for k, v in g.items() if k != "params"} for g in driver.opt.param_groups]}

    return groups(cand), groups(ref)
