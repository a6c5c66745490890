"""Bugs outside the math that the case matrix is built to catch: a wrong default path, cached
hyperparameters (schedulers), a lost closure loss, a broken add_param_group."""
import torch

import optparity.functional._common as common
import optparity.optim
from optparity.harness import check


def test_wrong_default_path_is_caught(monkeypatch):
    # foreach=None must pick torch's path (the for-loop on CPU); picking foreach changes bits.
    monkeypatch.setattr(common, "default_foreach", lambda params, differentiable: not differentiable)
    report = check("optparity.optim:Adam", paths=["default"], fail_fast=True)
    assert report.first_failure is not None and report.first_failure.case.path == "default"
    monkeypatch.undo()
    assert check("optparity.optim:Adam", paths=["default"]).ok


class CachedLrSGD(optparity.optim.SGD):
    """Reads lr once, as a buggy optimizer might: a scheduler's change is ignored."""

    def step(self, closure=None):
        first_lr = self.__dict__.setdefault("first_lr", [g["lr"] for g in self.param_groups])
        live = [g["lr"] for g in self.param_groups]
        for group, lr in zip(self.param_groups, first_lr):
            group["lr"] = lr
        try:
            return super().step(closure)
        finally:
            for group, lr in zip(self.param_groups, live):
                group["lr"] = lr


def test_cached_learning_rate_is_caught():
    report = check(CachedLrSGD, "torch.optim:SGD", paths=["forloop"], dtypes=[torch.float64],
                   param_sets=["mixed"], fail_fast=True)
    first = report.first_failure
    assert first is not None and first.divergence.step >= 7  # the lr changes after step 6


class LosesClosureLoss(optparity.optim.Adam):
    def step(self, closure=None):
        super().step(closure)
        return None


def test_lost_closure_loss_is_caught():
    report = check(LosesClosureLoss, "torch.optim:Adam", paths=["forloop"], dtypes=[torch.float32],
                   param_sets=["mixed"], fail_fast=True)
    first = report.first_failure
    assert first is not None and first.divergence.step == 2 and "step(closure) returned" in first.message


class AddedGroupIgnoresDefaults(optparity.optim.RMSprop):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.constructed = True

    def add_param_group(self, param_group):
        if getattr(self, "constructed", False):  # groups added later get the first group's lr
            param_group = {**param_group, "lr": self.param_groups[0]["lr"]}
        super().add_param_group(param_group)


def test_broken_add_param_group_is_caught():
    report = check(AddedGroupIgnoresDefaults, "torch.optim:RMSprop", paths=["forloop"], fail_fast=True)
    first = report.first_failure
    assert first is not None and first.case.param_set == "added_group"


class DropsLastGroupInStateDict(optparity.optim.SGD):
    def state_dict(self):
        sd = super().state_dict()
        sd["param_groups"] = sd["param_groups"][:1]
        return sd


def test_state_dict_group_count_is_compared():
    report = check(DropsLastGroupInStateDict, "torch.optim:SGD", paths=["forloop"], dtypes=[torch.float64],
                   param_sets=["groups"], fail_fast=True)
    first = report.first_failure
    assert first is not None and "1 param groups in the candidate's state_dict, 2 in the reference's" in first.message
