"""The scheduler axis (harness/schedulers.py): LR schedulers stepping alongside the optimizer,
scalar and tensor lr, param groups compared every step; and its teeth: optimizers that cache
lr or momentum, or snapshot a tensor lr, are caught by scheduler cases."""
import pytest
import torch

import optparity.optim
from optparity.harness import check, matrix, schedulers


def _scheduler_cases(algo, recipe=None):
    # the scheduler axis's own cases (covering cases of harness/covering.py carry schedulers too)
    return [c for c in matrix.build_cases([algo]) if c.axis == "scheduler" and (recipe is None or c.scheduler == recipe)]


def test_matrix_has_every_recipe_with_scalar_and_tensor_lr():
    for algo in schedulers.SCHEDULED:
        cases = _scheduler_cases(algo)
        assert {c.scheduler for c in cases} == set(schedulers.RECIPES)
        assert {type(c.config["lr"]) for c in cases} == {float, torch.Tensor}
        assert all(c.axis == "scheduler" and c.param_set == "mixed" for c in cases)
    ids = [c.id for c in matrix.build_cases(list(schedulers.SCHEDULED))]
    assert len(ids) == len(set(ids))
    assert not matrix.build_cases(["Adagrad"]) or not _scheduler_cases("Adagrad")


def test_schedulers_really_move_the_hyperparameters():
    # drive torch's SGD through the scheduled drivers and watch lr and momentum change
    from optparity.harness.candidates import make_driver
    from optparity.harness.params import make_grads, make_params

    for case in _scheduler_cases("SGD"):
        pset = make_params(case.param_set, case.dtype, case.seed, case.second_group)
        driver = make_driver(torch.optim.SGD, "optimizer", "SGD", pset, dict(case.config))
        schedulers.attach(case, driver)
        seen_lr, seen_momentum = set(), set()
        for step in range(1, case.steps + 1):
            driver.step(make_grads(pset, case.seed, step), step)
            group = driver.opt.param_groups[0]
            seen_lr.add(float(group["lr"]))
            seen_momentum.add(group["momentum"])
            if isinstance(case.config["lr"], torch.Tensor):
                assert isinstance(group["lr"], torch.Tensor)  # filled in place, never replaced
        assert len(seen_lr) >= 3, (case.id, seen_lr)
        assert (len(seen_momentum) > 1) == (case.scheduler == "OneCycleLR"), case.id


@pytest.mark.parametrize("algo", list(schedulers.SCHEDULED))
def test_optparity_and_torch_pass_the_scheduler_cases(algo):
    cases = _scheduler_cases(algo)
    for candidate in (getattr(optparity.optim, algo), getattr(torch.optim, algo)):
        report = check(candidate, f"torch.optim:{algo}", cases=cases)
        assert report.ok, report.first_failure.message
        assert len(report.results) == len(cases) and all(r.verdict == "bit_identical" for r in report.results)


class LrCachedAtConstruction(optparity.optim.SGD):
    """Reads every group's lr once, when built, as a buggy optimizer might."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_lr = [float(g["lr"]) for g in self.param_groups]

    def step(self, closure=None):
        live = [g["lr"] for g in self.param_groups]
        for group, lr in zip(self.param_groups, self.first_lr):
            group["lr"] = lr
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, live):
                group["lr"] = lr


class MomentumCachedAtConstruction(optparity.optim.SGD):
    """Ignores later changes of momentum (OneCycleLR cycles it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_momentum = [g["momentum"] for g in self.param_groups]

    def step(self, closure=None):
        live = [g["momentum"] for g in self.param_groups]
        for group, m in zip(self.param_groups, self.first_momentum):
            group["momentum"] = m
        try:
            return super().step(closure)
        finally:
            for group, m in zip(self.param_groups, live):
                group["momentum"] = m


class TensorLrSnapshot(optparity.optim.SGD):
    """Keeps a copy of a tensor lr taken at construction; a scheduler fills the original in place."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.snapshots = [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else None for g in self.param_groups]

    def step(self, closure=None):
        live = [g["lr"] for g in self.param_groups]
        for group, snap in zip(self.param_groups, self.snapshots):
            if snap is not None:
                group["lr"] = snap
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, live):
                group["lr"] = lr


def _failing(candidate, cases):
    report = check(candidate, "torch.optim:SGD", algorithm="SGD", cases=cases)
    return {r.case.id for r in report.failed}, report


def test_lr_cached_at_construction_is_caught_by_every_recipe():
    cases = _scheduler_cases("SGD")
    failed, report = _failing(LrCachedAtConstruction, cases)
    assert failed == {c.id for c in cases}, report.results
    first = report.first_failure.divergence
    assert first.step >= 1


def test_cached_momentum_is_caught_by_one_cycle_only():
    cases = _scheduler_cases("SGD")
    failed, _ = _failing(MomentumCachedAtConstruction, cases)
    assert failed == {c.id for c in cases if c.scheduler == "OneCycleLR"}
    # the ordinary matrix never changes momentum: without the scheduler axis this slips through
    base = [c for c in matrix.build_cases(["SGD"], ("forloop",), (torch.float32,), ("mixed",)) if c.axis == "base"]
    assert _failing(MomentumCachedAtConstruction, base)[0] == set()


def test_tensor_lr_snapshot_is_caught_by_tensor_lr_cases_only():
    cases = _scheduler_cases("SGD")
    failed, _ = _failing(TensorLrSnapshot, cases)
    assert failed == {c.id for c in cases if isinstance(c.config["lr"], torch.Tensor)}


def test_scheduler_survives_reloads():
    # the runner rebuilds the optimizers from state dicts mid-run; the scheduler must carry on
    # from where it was: a candidate rebuilt with a fresh scheduler state would differ after
    case = _scheduler_cases("SGD", "StepLR")[0]
    from optparity.harness.candidates import make_driver
    from optparity.harness.params import make_grads, make_params

    lrs = {}
    for reload in (False, True):
        pset = make_params(case.param_set, case.dtype, case.seed, case.second_group)
        driver = make_driver(torch.optim.SGD, "optimizer", "SGD", pset, dict(case.config))
        schedulers.attach(case, driver)
        lrs[reload] = []
        for step in range(1, case.steps + 1):
            driver.step(make_grads(pset, case.seed, step), step)
            if reload and step in (matrix.RELOAD_OWN, matrix.CROSS_LOAD):
                driver.reload(driver.state_dict())
            lrs[reload].append(driver.opt.param_groups[0]["lr"])
    assert lrs[True] == lrs[False] and len(set(lrs[False])) >= 4


def test_unknown_recipe_is_refused():
    case = _scheduler_cases("SGD")[0]
    case.scheduler = "CosineWarmRestarts"
    with pytest.raises(ValueError, match="unknown scheduler recipe 'CosineWarmRestarts'"):
        schedulers.attach(case)
