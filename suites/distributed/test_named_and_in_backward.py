"""NamedOptimizer and in-backward optimizers, bit for bit against torch 2.13.

Single-process tests (plain pytest): NamedOptimizer against the optimizer it wraps and against
torch's _NamedOptimizer (state_dict layout, cross-loading, init_state, errors);
apply_optimizer_in_backward against plain optimizers and torch's _apply_optimizer_in_backward.
The DDP checks use the rank pool (world sizes 1 and 2): DDP takes over the in-backward step
and must find our hooks to remove them.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.optim import _apply_optimizer_in_backward as torch_apply_in_backward
from torch.distributed.optim import _get_in_backward_optimizers as torch_get_in_backward
from torch.distributed.optim import _NamedOptimizer as TorchNamedOptimizer

import optparity.optim as oo
from optparity.distributed.apply_optimizer_in_backward import (
    apply_optimizer_in_backward,
    get_in_backward_optimizers,
)
from optparity.distributed.named_optimizer import NamedOptimizer
from optparity.harness.bitwise import compare

STEPS = 15

# valid for torch.optim and optparity.optim alike; every optional branch switched on somewhere
ALGOS = {
    "Adadelta": dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
    "Adam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "Adamax": dict(lr=0.02, weight_decay=0.01, maximize=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01),
    "Rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05)),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
}
FAMILIES = {"optparity": oo, "torch": torch.optim}


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)


def _loss(model, step):
    x, y = _batch(step)
    return ((model(x) - y) ** 2).mean()


def _train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        optimizer.zero_grad()
        _loss(model, step).backward()
        optimizer.step()


def _train_named(model, named, steps, start=0):
    # NamedOptimizer has no working zero_grad (as upstream: Optimizer.__init__ never ran)
    for step in range(start, start + steps):
        for p in model.parameters():
            p.grad = None
        _loss(model, step).backward()
        named.step()


def _diffs(a, b, path="") -> list[str]:
    """Every difference between two nested state structures; tensors compared bit for bit,
    dict key order included (it is part of the layout)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        d = compare(a, b)
        return [] if d is None else [f"{path}: {d.describe()}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [x for k in a for x in _diffs(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and type(a) is type(b):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [x for i, (u, v) in enumerate(zip(a, b)) for x in _diffs(u, v, f"{path}[{i}]")]
    return [] if (type(a) is type(b) and a == b) else [f"{path}: {a!r} vs {b!r}"]


def _param_diffs(m1, m2):
    return [x for (n, p), q in zip(m1.named_parameters(), m2.parameters()) for x in _diffs(p, q, n)]


def _named_pair(model_ours, model_theirs, name, family="optparity", **extra):
    kwargs = {**ALGOS[name], **extra}
    ours = NamedOptimizer(model_ours.named_parameters(), getattr(FAMILIES[family], name), **kwargs)
    theirs = TorchNamedOptimizer(model_theirs.named_parameters(), getattr(torch.optim, name), **kwargs)
    return ours, theirs


# ---------------------------------------------------------------------------
# NamedOptimizer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["optparity", "torch"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_named_optimizer_matches_plain_and_upstream(name, family):
    """Training through NamedOptimizer is the wrapped optimizer's training, bit for bit, and
    the FQN state_dict is upstream _NamedOptimizer's (layout, values, bits)."""
    plain_model, ours_model, theirs_model = _model(), _model(), _model()
    plain = getattr(torch.optim, name)(plain_model.parameters(), **ALGOS[name])
    ours, theirs = _named_pair(ours_model, theirs_model, name, family)
    _train(plain_model, plain, STEPS)
    _train_named(ours_model, ours, STEPS)
    _train_named(theirs_model, theirs, STEPS)
    assert not _param_diffs(ours_model, plain_model)
    assert not _param_diffs(theirs_model, plain_model)

    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert not _diffs(ours_sd, theirs_sd)
    assert list(ours_sd["state"]) == [n for n, _ in ours_model.named_parameters()]
    assert ours_sd["param_groups"][0]["params"] == sorted(n for n, _ in ours_model.named_parameters())
    # state tensors are the wrapped optimizer's own (no copies), as upstream
    assert ours_sd["state"]["0.weight"] is ours._optimizer.state_dict()["state"][0]
    # the state dict of the wrapped optimizer, renamed: nothing else
    plain_sd = plain.state_dict()
    assert not _diffs(list(ours_sd["state"].values()), list(plain_sd["state"].values()))


def test_named_optimizer_param_groups_and_order():
    """Groups listing params in an order unlike the module's: keys follow the groups, each
    group's FQNs are sorted, hyperparameters per group, equal to upstream."""
    ours_model, theirs_model, plain_model = _model(), _model(), _model()

    def groups(m):
        p = dict(m.named_parameters())
        return [{"params": [p["4.bias"], p["0.weight"]], "lr": 0.02},
                {"params": [p["2.weight"], p["0.bias"]], "lr": 0.05, "momentum": 0.5}]

    with pytest.warns(UserWarning, match="Since we pass in param_groups"):
        ours = NamedOptimizer(ours_model.named_parameters(), oo.SGD, groups(ours_model), None, lr=0.1, momentum=0.9)
    with pytest.warns(UserWarning, match="Since we pass in param_groups"):
        theirs = TorchNamedOptimizer(theirs_model.named_parameters(), torch.optim.SGD, groups(theirs_model),
                                     None, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(groups(plain_model), lr=0.1, momentum=0.9)
    assert ours.ordered_param_keys == ["4.bias", "0.weight", "2.weight", "0.bias"]
    assert ours.ordered_param_keys == theirs.ordered_param_keys
    assert ours.param_groups is ours._optimizer.param_groups
    _train(plain_model, plain, STEPS)
    _train_named(ours_model, ours, STEPS)
    _train_named(theirs_model, theirs, STEPS)
    assert not _param_diffs(ours_model, plain_model)
    sd = ours.state_dict()
    assert not _diffs(sd, theirs.state_dict())
    assert [g["params"] for g in sd["param_groups"]] == [["0.weight", "4.bias"], ["0.bias", "2.weight"]]
    assert list(sd["state"]) == ["4.bias", "0.weight", "2.weight", "0.bias"]


@pytest.mark.parametrize("name", list(ALGOS))
def test_named_optimizer_cross_loads_with_upstream(name):
    """A checkpoint taken by either implementation loads into the other (after init_state), and
    training resumed from it continues bit for bit like uninterrupted training."""
    k = 6
    ref_model = _model()
    ref = getattr(torch.optim, name)(ref_model.parameters(), **ALGOS[name])
    _train(ref_model, ref, STEPS)

    for source_cls, target_cls in ((TorchNamedOptimizer, NamedOptimizer), (NamedOptimizer, TorchNamedOptimizer)):
        src_model = _model()
        src_family = torch.optim if source_cls is TorchNamedOptimizer else oo
        src = source_cls(src_model.named_parameters(), getattr(src_family, name), **ALGOS[name])
        _train_named(src_model, src, k)
        checkpoint = copy.deepcopy(src.state_dict())

        # a fresh model from the same weights, but a different hyperparameter that the load
        # must overwrite, and state that init_state creates and the load replaces in place
        dst_model = _model()
        dst_model.load_state_dict(src_model.state_dict())
        dst_family = oo if target_cls is NamedOptimizer else torch.optim
        dst = target_cls(dst_model.named_parameters(), getattr(dst_family, name),
                         **{**ALGOS[name], "lr": 123.0})
        dst.init_state()
        # init_state is a real step (on zero grads): with weight decay it moves the weights
        dst_model.load_state_dict(src_model.state_dict())
        state_tensors = {id(t) for st in dst.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
        dst.load_state_dict(checkpoint)
        assert dst._optimizer.param_groups[0]["lr"] == ALGOS[name]["lr"]
        if target_cls is NamedOptimizer:
            # upstream's param_groups still show the pre-load dicts; ours follow the optimizer
            assert dst.param_groups is dst._optimizer.param_groups
        assert not _diffs(dst.state_dict(), checkpoint)
        _train_named(dst_model, dst, STEPS - k, start=k)
        assert not _param_diffs(dst_model, ref_model), (source_cls.__name__, target_cls.__name__)
        assert state_tensors, "init_state created no state"


def test_named_optimizer_load_is_in_place_like_upstream():
    """Loading copies into the live state tensors (whoever holds them sees the new values),
    exactly as upstream; state of params absent from the checkpoint is left alone."""
    results = []
    for cls, family in ((NamedOptimizer, oo), (TorchNamedOptimizer, torch.optim)):
        m = _model()
        opt = cls(m.named_parameters(), family.Adam, lr=0.01)
        _train_named(m, opt, 3)
        live = opt.state[m[0].weight]["exp_avg"]
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            st["exp_avg"].mul_(2)
        del sd["state"]["4.bias"]
        before_bias = opt.state[m[4].bias]["exp_avg"].clone()
        opt.load_state_dict(sd)
        results.append((live.clone(), opt.state_dict()))
        assert torch.equal(live, sd["state"]["0.weight"]["exp_avg"])
        assert torch.equal(opt.state[m[4].bias]["exp_avg"], before_bias)
    assert not _diffs(results[0], results[1])


def test_init_state_matches_upstream():
    for name in ALGOS:
        for family in (oo, torch.optim):
            ours_model, theirs_model = _model(), _model()
            ours, theirs = _named_pair(ours_model, theirs_model, name,
                                       "optparity" if family is oo else "torch")
            ours.init_state()
            theirs.init_state()
            assert not _diffs(ours.state_dict(), theirs.state_dict()), name
            assert not _param_diffs(ours_model, theirs_model), name
            assert all(p.grad is not None and not p.grad.any() for p in ours_model.parameters())
            assert len(ours.state) == len(list(ours_model.parameters()))
    # params that do not require grad get no gradient and no state, as upstream
    frozen = []
    for cls in (NamedOptimizer, TorchNamedOptimizer):
        m = _model()
        m[0].weight.requires_grad_(False)
        opt = cls(m.named_parameters(), torch.optim.Adam, lr=0.01)
        opt.init_state()
        frozen.append((m[0].weight.grad, list(opt.state_dict()["state"])))
    assert frozen[0] == frozen[1] and frozen[0][0] is None and "0.weight" not in frozen[0][1]


def test_add_param_group():
    ours_model, theirs_model = _model(), _model()
    extra_ours, extra_theirs = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))

    def named(m, extra):
        return list(m[0].named_parameters(prefix="0")) + [("extra", extra)]

    ours = NamedOptimizer(named(ours_model, extra_ours), oo.Adagrad, [{"params": [ours_model[0].weight]}], None, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = TorchNamedOptimizer(named(theirs_model, extra_theirs), torch.optim.Adagrad,
                                     [{"params": [theirs_model[0].weight]}], None, lr=0.1)
    ours.add_param_group({"params": extra_ours, "lr": 0.3})  # a bare tensor, as upstream allows
    theirs.add_param_group({"params": extra_theirs, "lr": 0.3})
    ours.add_param_group({"params": iter([ours_model[0].bias])})
    theirs.add_param_group({"params": iter([theirs_model[0].bias])})
    assert ours.ordered_param_keys == theirs.ordered_param_keys == ["0.weight", "extra", "0.bias"]
    assert ours.param_groups is ours._optimizer.param_groups and len(ours.param_groups) == 3
    for m, extra, opt in ((ours_model, extra_ours, ours), (theirs_model, extra_theirs, theirs)):
        for step in range(4):
            for p in (*m[0].parameters(), extra):
                p.grad = None
            (_loss(m, step) + (extra * extra).sum()).backward()
            opt.step()
    assert not _diffs(ours.state_dict(), theirs.state_dict())


def test_add_param_group_errors_leave_the_optimizer_untouched():
    m = _model()
    outsider = nn.Parameter(torch.ones(2))
    named = list(m.named_parameters())[:2]
    ours = NamedOptimizer(named, oo.SGD, [{"params": [m[0].weight]}], None, lr=0.1)
    with pytest.raises(AssertionError, match="^param group must be a dict$"):
        ours.add_param_group([m[0].bias])
    # upstream records "0.bias" before it meets the outsider (and keeps it); we record nothing
    with pytest.raises(ValueError, match="^some parameters are not in the module$"):
        ours.add_param_group({"params": [m[0].bias, outsider]})
    # the wrapped optimizer refusing the group (a param already in a group) changes nothing either
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        ours.add_param_group({"params": [m[0].bias, m[0].weight]})
    assert ours.ordered_param_keys == ["0.weight"]
    assert len(ours.param_groups) == 1
    ours.add_param_group({"params": [m[0].bias]})
    assert ours.ordered_param_keys == ["0.weight", "0.bias"]


def _both(build):
    """Run `build(NamedOptimizer-ish class, optimizer family)` for both implementations and
    return (our exception, upstream's)."""
    caught = []
    for cls, family in ((NamedOptimizer, oo), (TorchNamedOptimizer, torch.optim)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build(cls, family)
        except Exception as exc:  # noqa: BLE001 - compared below
            caught.append(exc)
        else:
            caught.append(None)
    return caught


def _initialized(cls, family, name="Adam"):
    m = _model()
    opt = cls(m.named_parameters(), getattr(family, name), lr=0.01)
    opt.init_state()
    return m, opt


def _sd_without(key_path):
    def build(cls, family):
        _, opt = _initialized(cls, family)
        sd = copy.deepcopy(opt.state_dict())
        where = sd
        for k in key_path[:-1]:
            where = where[k]
        del where[key_path[-1]]
        opt.load_state_dict(sd)
    return build


def _sd_with_extra(key_path, value):
    def build(cls, family):
        _, opt = _initialized(cls, family)
        sd = copy.deepcopy(opt.state_dict())
        where = sd
        for k in key_path[:-1]:
            where = where[k]
        where[key_path[-1]] = value
        opt.load_state_dict(sd)
    return build


def _sd_renamed(key_path, old, new):
    def build(cls, family):
        _, opt = _initialized(cls, family)
        sd = copy.deepcopy(opt.state_dict())
        where = sd
        for k in key_path:
            where = where[k]
        where[new] = where.pop(old)
        opt.load_state_dict(sd)
    return build


def _groups_build(groups_of):
    def build(cls, family):
        m = _model()
        cls(m.named_parameters(), family.SGD, groups_of(m), None, lr=0.1)
    return build


def _load_uninitialized(cls, family):
    m, opt = _initialized(cls, family)
    sd = opt.state_dict()
    fresh = cls(_model().named_parameters(), family.Adam, lr=0.01)
    fresh.load_state_dict(sd)


def _zero_grad(cls, family):
    m = _model()
    cls(m.named_parameters(), family.SGD, lr=0.1).zero_grad()


def _group_key_missing(cls, family):
    _, opt = _initialized(cls, family)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["bogus"] = 1
    del sd["param_groups"][0]["lr"]
    opt.load_state_dict(sd)


BAD_INPUTS = {
    "group not a dict": _groups_build(lambda m: [list(m.parameters())]),
    "group without params": _groups_build(lambda m: [{"lr": 0.1}]),
    "group with a non-tensor": _groups_build(lambda m: [{"params": [m[0].weight, 3.0]}]),
    "group param not named": _groups_build(lambda m: [{"params": [nn.Parameter(torch.ones(2))]}]),
    "load before init": _load_uninitialized,
    "load: a state entry missing": _sd_without(("state", "2.bias", "exp_avg_sq")),
    "load: a state entry renamed": _sd_renamed(("state", "2.bias"), "exp_avg_sq", "bogus"),
    "load: a tensor entry not a tensor": _sd_with_extra(("state", "2.bias", "exp_avg"), 0.5),
    "load: state of another size": _sd_with_extra(("state", "0.weight", "bogus"), torch.zeros(1)),
    "load: group of another size": _sd_with_extra(("param_groups", 0, "bogus"), 1),
    "load: group key unknown": _group_key_missing,
    "zero_grad (never worked upstream)": _zero_grad,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_like_upstream(case):
    ours, theirs = _both(BAD_INPUTS[case])
    assert theirs is not None, "upstream accepted it"
    assert type(ours) is type(theirs)
    # messages name tensors by value; both print the same tensors
    assert str(ours).replace("NamedOptimizer", "_NamedOptimizer").replace("__", "_") == \
        str(theirs).replace("__", "_")


def test_load_missing_params_and_groups_are_skipped():
    """Checkpoints from conditional training (some params never stepped, a group the
    checkpoint does not know) load fine, as upstream."""
    results = []
    for cls, family in ((NamedOptimizer, oo), (TorchNamedOptimizer, torch.optim)):
        m, opt = _initialized(cls, family)
        sd = copy.deepcopy(opt.state_dict())
        del sd["state"]["0.weight"]
        sd["param_groups"][0]["params"] = ["nothing"]
        sd["param_groups"][0]["lr"] = 5.0
        opt.load_state_dict(sd)
        results.append(opt.state_dict())
        assert opt.param_groups[0]["lr"] == 0.01  # the unknown group was not applied
    assert not _diffs(results[0], results[1])


def test_named_optimizer_is_an_optimizer_and_takes_positional_args():
    m = _model()
    opt = NamedOptimizer(m.named_parameters(), oo.SGD, None, m, 0.25)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.module is m
    assert opt.state is opt._optimizer.state
    losses = []

    def closure():
        for p in m.parameters():
            p.grad = None
        loss = _loss(m, 0)
        loss.backward()
        losses.append(loss)
        return loss

    assert opt.step(closure) is losses[0]


# ---------------------------------------------------------------------------
# apply_optimizer_in_backward
# ---------------------------------------------------------------------------

def _attached(param):
    return (param._optimizer_classes, param._optimizer_kwargs, len(param._in_backward_optimizers))


@pytest.mark.parametrize("family", ["optparity", "torch"])
@pytest.mark.parametrize("name", list(ALGOS))
def test_in_backward_matches_plain_and_upstream(name, family):
    """Stepping each param right after its gradient is accumulated equals a plain optimizer
    stepping after backward, bit for bit; same as upstream's in-backward optimizers."""
    cls = getattr(FAMILIES[family], name)
    ours_model, theirs_model, plain_model = _model(), _model(), _model()
    kwargs = ALGOS[name]
    apply_optimizer_in_backward(cls, ours_model.parameters(), kwargs)
    torch_apply_in_backward(getattr(torch.optim, name), theirs_model.parameters(), kwargs)
    plain = getattr(torch.optim, name)(plain_model.parameters(), **kwargs)
    for step in range(STEPS):
        _loss(ours_model, step).backward()
        _loss(theirs_model, step).backward()
        assert all(p.grad is None for p in ours_model.parameters())
        plain.zero_grad()
        _loss(plain_model, step).backward()
        plain.step()
    assert not _param_diffs(ours_model, plain_model)
    assert not _param_diffs(ours_model, theirs_model)

    ours_opts, theirs_opts = get_in_backward_optimizers(ours_model), torch_get_in_backward(theirs_model)
    assert len(ours_opts) == len(theirs_opts) == len(list(ours_model.parameters()))
    assert all(type(o) is cls for o in ours_opts)
    for o, t in zip(ours_opts, theirs_opts):
        assert not _diffs(o.state_dict(), t.state_dict())
    for p in ours_model.parameters():
        assert p._optimizer_classes == [cls] and p._optimizer_kwargs == [kwargs]
        assert p._optimizer_kwargs[0] is kwargs  # the caller's dict, as upstream
        assert p._in_backward_optimizers[0].param_groups[0]["params"][0] is p


def test_in_backward_several_optimizers_and_no_hook():
    """Two optimizers on one param, different optimizers on different params, and
    register_hook=False (attached, never stepped by backward), all as upstream."""
    models = []
    for apply, family in ((apply_optimizer_in_backward, oo), (torch_apply_in_backward, torch.optim)):
        m = _model()
        params = list(m.parameters())
        apply(family.SGD, params[:2], {"lr": 0.1, "momentum": 0.9})
        apply(family.Adam, params[1:4], {"lr": 0.01})
        apply(family.RMSprop, params[4:], {"lr": 0.01}, register_hook=False)
        for step in range(5):
            _loss(m, step).backward()
        models.append(m)
    ours, theirs = models
    assert not _param_diffs(ours, theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert [c.__name__ for c in p._optimizer_classes] == [c.__name__ for c in q._optimizer_classes]
        assert p._optimizer_kwargs == q._optimizer_kwargs
        assert (p.grad is None) == (q.grad is None)
        for o, t in zip(p._in_backward_optimizers, q._in_backward_optimizers):
            assert not _diffs(o.state_dict(), t.state_dict())
    unhooked = list(ours.parameters())[4:]
    # without a hook nothing stepped and the gradient stays
    assert all(p.grad is not None and not p._in_backward_optimizers[0].state for p in unhooked)
    assert [len(p._in_backward_optimizers) for p in ours.parameters()] == [1, 2, 1, 1, 1, 1]
    assert len(get_in_backward_optimizers(ours)) == 7


def test_in_backward_shared_param_and_upstream_mix():
    """A param used twice accumulates once and steps once per backward; a param given one
    optimizer by upstream's function and one by ours uses a single AccumulateGrad node and
    both optimizers step (the tables are torch's)."""
    results = []
    for apply in (apply_optimizer_in_backward, torch_apply_in_backward):
        torch.manual_seed(1)
        shared = nn.Linear(4, 4)
        apply(torch.optim.SGD, shared.parameters(), {"lr": 0.1})
        for step in range(4):
            x = torch.randn(3, 4, generator=torch.Generator().manual_seed(step))
            shared(torch.tanh(shared(x))).sum().backward()
        results.append([p.detach().clone() for p in shared.parameters()])
    assert not _diffs(results[0], results[1])

    mixed, twice = nn.Linear(3, 2), None
    twice = copy.deepcopy(mixed)
    torch_apply_in_backward(torch.optim.SGD, mixed.parameters(), {"lr": 0.1})
    apply_optimizer_in_backward(oo.Adam, mixed.parameters(), {"lr": 0.01})
    torch_apply_in_backward(torch.optim.SGD, twice.parameters(), {"lr": 0.1})
    torch_apply_in_backward(torch.optim.Adam, twice.parameters(), {"lr": 0.01})
    for step in range(4):
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(step))
        mixed(x).sum().backward()
        twice(x).sum().backward()
    assert not _param_diffs(mixed, twice)
    from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map
    assert len(param_to_optim_hook_handle_map[mixed.weight]) == 2


def test_in_backward_bad_inputs_change_nothing():
    m = _model()
    params = list(m.parameters())
    params[3].requires_grad_(False)
    # upstream attaches to params[0..2] before failing on params[3]; we attach nowhere
    with pytest.raises(AttributeError) as ours:
        apply_optimizer_in_backward(oo.SGD, params, {"lr": 0.1})
    assert not any(hasattr(p, "_in_backward_optimizers") for p in params)
    m2 = _model()
    params2 = list(m2.parameters())
    params2[3].requires_grad_(False)
    with pytest.raises(AttributeError) as theirs:
        torch_apply_in_backward(torch.optim.SGD, params2, {"lr": 0.1})
    assert str(ours.value) == str(theirs.value)

    with pytest.raises(ValueError, match=r"^Invalid learning rate: -1\.0$"):
        apply_optimizer_in_backward(oo.Adam, params[:3], {"lr": -1.0})
    with pytest.raises(TypeError):
        apply_optimizer_in_backward(oo.Adam, params[:3], {"bogus": 1})
    assert not any(hasattr(p, "_in_backward_optimizers") for p in params)
    _loss(m, 0).backward()
    assert all(p.grad is not None for p in params if p.requires_grad)


# --- DDP takes over the in-backward step; it must find and remove our hooks ---

def _ddp_in_backward(rank, world_size, backend):
    """DDP removes the hooks it finds in torch's handle table: ours must be there, or every
    parameter would step twice. With CUDA, also train: ours equals upstream and a plain
    optimizer. (On CPU torch 2.13's DDP in-backward path itself fails: its end-of-backward
    callback asks torch.accelerator for a stream.)"""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    model = _model().to(device)
    apply_optimizer_in_backward(oo.Adam, model.parameters(), {"lr": 0.01})
    from torch.distributed.optim.apply_optimizer_in_backward import param_to_optim_hook_handle_map

    handles = [h for p in model.parameters() for h in param_to_optim_hook_handle_map[p]]
    assert handles and all(h.id in h.hooks_dict_ref() for h in handles)
    ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
    try:
        ddp(_batch(0)[0].to(device))  # DDP takes the hooks over lazily, at its first forward
    except RuntimeError as e:  # torch.AcceleratorError is one
        if device.type == "cuda" or "CUDA" not in str(e):
            raise
        # torch 2.15's DDP creates a torch.Stream() for in-backward optimizers at its first
        # forward: a CUDA build on a machine without a CUDA driver fails there, upstream's too
        return f"upstream's DDP in-backward setup needs a CUDA driver on this torch ({torch.__version__}): {str(e).splitlines()[0]}"
    assert not any(h.id in h.hooks_dict_ref() for h in handles), "DDP left our hooks in place"
    if device.type != "cuda":
        return True

    finals = []
    for apply, cls in ((apply_optimizer_in_backward, oo.Adam), (torch_apply_in_backward, torch.optim.Adam),
                       (None, torch.optim.Adam)):
        model = _model().to(device)
        if apply is not None:
            apply(cls, model.parameters(), {"lr": 0.01})
        ddp = DDP(model, device_ids=[rank])
        plain = cls(model.parameters(), lr=0.01) if apply is None else None
        for step in range(6):
            x, y = (t.to(device) for t in _batch(step * world_size + rank))
            if plain is not None:
                plain.zero_grad()
            ((ddp(x) - y) ** 2).mean().backward()
            if plain is not None:
                plain.step()
        finals.append([p.detach().cpu().clone() for p in model.parameters()])
    diffs = _diffs(finals[0], finals[1]) + _diffs(finals[0], finals[2])
    assert not diffs, diffs
    return True


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_in_backward_under_ddp(ranks, world_size, backend):
    pool = ranks(world_size, backend)
    results = pool.run(_ddp_in_backward, backend)
    skipped = [r for r in results if isinstance(r, str)]
    if skipped:
        pytest.skip(skipped[0])
    assert all(results)


# --- NamedOptimizer over an FSDP module: both state-dict paths go through FSDP ---

def _fsdp_named(rank, world_size, backend):
    """With `module` an FSDP module, state_dict() is passed through FSDP.optim_state_dict and
    load_state_dict through FSDP.optim_state_dict_to_load, exactly as upstream: same state
    dict, bit for bit, and the same outcome on load (in torch 2.13 that load fails inside
    FSDP for FQNs from the wrapper's named_parameters, for both implementations)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    outcomes = []
    for cls, family in ((NamedOptimizer, oo), (TorchNamedOptimizer, torch.optim)):
        fsdp = FSDP(_model().to(device), device_id=device, use_orig_params=True)
        opt = cls(fsdp.named_parameters(), family.Adam, module=fsdp, lr=0.01)
        for step in range(3):
            for p in fsdp.parameters():
                p.grad = None
            x, y = (t.to(device) for t in _batch(step * world_size + rank))
            ((fsdp(x) - y) ** 2).mean().backward()
            opt.step()
        sd = opt.state_dict()
        try:
            opt.load_state_dict(copy.deepcopy(sd))
            load = None
        except Exception as exc:  # noqa: BLE001 - compared below
            load = (type(exc).__name__, str(exc))
        outcomes.append((sd, load, [p.detach().cpu().clone() for p in fsdp.parameters()]))
    (ours_sd, ours_load, ours_params), (theirs_sd, theirs_load, theirs_params) = outcomes
    diffs = _diffs(ours_sd, theirs_sd) + _diffs(ours_params, theirs_params)
    assert not diffs, diffs
    assert ours_sd["state"], "no state to compare"
    assert ours_load == theirs_load, (ours_load, theirs_load)
    return ours_load


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_named_optimizer_with_fsdp_module(ranks, world_size, backend):
    pool = ranks(world_size, backend)
    pool.run(_fsdp_named, backend)
