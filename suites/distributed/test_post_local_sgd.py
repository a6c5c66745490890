"""Model averaging, PostLocalSGDOptimizer and the post-local SGD comm hook against torch 2.13.

Every check runs optparity's implementation and upstream's side by side in the same ranks, on
deep copies of one model fed the same rank-dependent batches, and compares parameters,
gradients and optimizer state bit for bit after every step. Which steps averaged is observed
two ways and compared with the schedule worked out independently here:
  - averaging rebinds ``param.data`` to a fresh flat buffer, so the storage pointer changes on
    exactly the steps that averaged (works for any world size, even 1);
  - the ranks holding bit-equal parameters after the step are exactly the averaging groups
    (rank-dependent data makes every other pair of ranks differ).
"""
from __future__ import annotations

import copy
import io
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import post_localSGD_hook as up_hook
from torch.distributed.algorithms.model_averaging import averagers as up_avg
from torch.distributed.algorithms.model_averaging import hierarchical_model_averager as up_hier
from torch.distributed.algorithms.model_averaging import utils as up_utils
from torch.distributed.optim import PostLocalSGDOptimizer as UpPostLocalSGDOptimizer

import optparity.optim as po
from optparity.distributed import comm_hooks as my_hook
from optparity.distributed import model_averaging as my_avg
from optparity.distributed.post_localSGD_optimizer import PostLocalSGDOptimizer
from optparity.harness.bitwise import compare

WORLD_SIZES = [1, 2, 3, 4]
BACKENDS = ["gloo", "nccl"]
STEPS = 10


# ---------------------------------------------------------------------------
# helpers (run inside the ranks)
# ---------------------------------------------------------------------------

def _device(rank, backend):
    return torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")


def _same(mine, ref, what):
    diff = compare(mine, ref)
    assert diff is None, f"{what}: {diff.describe()}"


def _same_params(mine, ref, what):
    for i, (a, b) in enumerate(zip(list(mine), list(ref), strict=True)):
        _same(a.detach(), b.detach(), f"{what}, param {i}")


def _net(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)


def _batch(rank, step, device):
    g = torch.Generator().manual_seed(7919 * rank + step)
    return torch.randn(4, 6, generator=g).to(device), torch.randn(4, 3, generator=g).to(device)


def _backward(model, rank, step, device):
    x, y = _batch(rank, step, device)
    ((model(x) - y) ** 2).mean().backward()


def _storage(model):
    return next(model.parameters()).untyped_storage().data_ptr()


def _equal_ranks(tensors, world_size):
    """Partition of the ranks into classes holding bit-identical ``tensors``."""
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    classes: list[list[int]] = []
    for r, v in enumerate(everyone):
        for c in classes:
            if compare(v, everyone[c[0]]) is None:
                c.append(r)
                break
        else:
            classes.append([r])
    return classes


def _chunks(world_size, size):
    """The groups dist.new_subgroups(size) makes over the world."""
    return [list(range(i, i + size)) for i in range(0, world_size, size)]


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn()
    return value, [(w.category, str(w.message), w.filename) for w in caught]


def _outcome(fn):
    """("ok", warnings) or (exception type, message): what the caller of fn observes."""
    try:
        _, caught = _warnings_of(fn)
        return ("ok", caught)
    except Exception as e:  # noqa: BLE001 - the outcome is what we compare
        return (type(e), str(e))


def _n_groups():
    return len(dist.distributed_c10d._world.pg_map)


def _optims(kind, mine_params, ref_params):
    if kind == "sgd":
        return (po.SGD(mine_params, lr=0.05, momentum=0.9),
                torch.optim.SGD(ref_params, lr=0.05, momentum=0.9))
    return po.Adam(mine_params, lr=0.01), torch.optim.Adam(ref_params, lr=0.01)


# ---------------------------------------------------------------------------
# average_parameters
# ---------------------------------------------------------------------------

def _check_average_parameters(rank, world_size, backend):
    dev = _device(rank, backend)
    g = torch.Generator()

    def params(mixed=True):
        # mixed dtypes (cat promotes to float64, unpacking casts back), a 0-dim param and -0.0;
        # with one dtype every param ends up a view of the shared flat buffer
        g.manual_seed(100 + rank)
        ts = [torch.randn(3, 4, generator=g),
              torch.randn(5, generator=g, dtype=torch.float64 if mixed else torch.float32),
              torch.tensor(-0.0) * (rank + 1), torch.randn(2, 2, generator=g)]
        return [nn.Parameter(t.to(dev)) for t in ts]

    def same_aliasing(mine, ref):
        # which params ended up sharing one storage must match too (views of the flat buffer)
        def pattern(ps):
            ptrs = [p.untyped_storage().data_ptr() for p in ps]
            return [[ptrs[i] == ptrs[j] for j in range(len(ps))] for i in range(len(ps))]
        assert pattern(mine) == pattern(ref), "params alias the flat buffer differently from upstream"

    # one-shot iterators, lists and generators, default and explicit groups
    for make_input in (iter, list, lambda ps: (p for p in ps)):
        for group, mixed in ((None, True), (dist.group.WORLD, False)):
            mine, ref = params(mixed), params(mixed)
            my_avg.average_parameters(make_input(mine), group)
            up_utils.average_parameters(make_input(ref), group)
            _same_params(mine, ref, "average_parameters")
            same_aliasing(mine, ref)
            assert _equal_ranks([p.double() for p in mine], world_size) == [list(range(world_size))]

    # subgroups, and a group this rank may not belong to (its params must stay as they were)
    size = 2 if world_size % 2 == 0 else 1
    sub, _ = dist.new_subgroups(group_size=size)
    only_zero = dist.new_group([0])
    for group, classes in ((sub, _chunks(world_size, size)),
                           (only_zero, [[r] for r in range(world_size)])):
        mine, ref = params(False), params(False)
        before = [p.untyped_storage().data_ptr() for p in mine]
        my_avg.average_parameters(iter(mine), group)
        up_utils.average_parameters(iter(ref), group)
        _same_params(mine, ref, "average_parameters in a subgroup")
        same_aliasing(mine, ref)
        assert _equal_ranks([p.double() for p in mine], world_size) == classes
        if group is only_zero and rank != 0:
            assert [p.untyped_storage().data_ptr() for p in mine] == before

    # params or param groups: only params that have a grad are averaged
    mine, ref = params(), params()
    for ps in (mine, ref):
        for i, p in enumerate(ps):
            if i != 1:
                p.grad = torch.ones_like(p)
    as_groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}]  # noqa: E731
    assert [id(p) for p in my_avg.get_params_to_average(as_groups(mine))] == \
           [id(p) for p in mine if p.grad is not None]
    assert [id(p) for p in my_avg.get_params_to_average(mine)] == \
           [id(p) for p in up_utils.get_params_to_average(mine)]
    my_avg.average_parameters_or_parameter_groups(as_groups(mine), None)
    up_utils.average_parameters_or_parameter_groups(as_groups(ref), None)
    _same_params(mine, ref, "average_parameters_or_parameter_groups (groups)")
    my_avg.average_parameters_or_parameter_groups(iter(mine), dist.group.WORLD)
    up_utils.average_parameters_or_parameter_groups(iter(ref), dist.group.WORLD)
    _same_params(mine, ref, "average_parameters_or_parameter_groups (params)")
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_average_parameters_bit_identical(ranks, world_size, backend):
    """average_parameters and the params-or-groups variant equal upstream's bits, dtypes and
    aliasing for every input form, in the world, in subgroups and for non-members."""
    assert all(ranks(world_size, backend).run(_check_average_parameters, backend))


# ---------------------------------------------------------------------------
# PeriodicModelAverager inside PostLocalSGDOptimizer (and used directly)
# ---------------------------------------------------------------------------

def _periodic_expected(step, period, warmup):
    return step >= warmup and (step - warmup) % period == 0


def _run_schedule(rank, world_size, dev, make_pair, expected_size, steps, opt_kind, wrapped, what):
    """Train mine and upstream side by side; assert bit parity and the averaging schedule.
    make_pair() -> (my averager, upstream averager); expected_size(step) -> group size or None."""
    model = _net(dev)
    mine_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    (mine_avg, ref_avg), caught = _warnings_of(make_pair)
    mine_local, ref_local = _optims(opt_kind, mine_model.parameters(), ref_model.parameters())
    if wrapped:
        mine_opt = PostLocalSGDOptimizer(mine_local, mine_avg)
        ref_opt = UpPostLocalSGDOptimizer(ref_local, ref_avg)
    for step in range(steps):
        before = _storage(mine_model)
        for m in (mine_model, ref_model):
            m.zero_grad()
            _backward(m, rank, step, dev)
        if wrapped:
            mine_opt.step()
            ref_opt.step()
        else:
            mine_local.step()
            ref_local.step()
            mine_avg.average_parameters(mine_model.parameters())
            ref_avg.average_parameters(ref_model.parameters())
        _same_params(mine_model.parameters(), ref_model.parameters(), f"{what}, step {step}")
        assert mine_avg.step == ref_avg.step == step + 1
        size = expected_size(step)
        assert (_storage(mine_model) != before) == (size is not None), f"{what}: step {step} averaged?"
        classes = _equal_ranks(list(mine_model.parameters()), world_size)
        want = _chunks(world_size, size) if size is not None else [[r] for r in range(world_size)]
        assert classes == want, f"{what}, step {step}: equal ranks {classes}, expected {want}"
    if wrapped:
        mine_sd, ref_sd = mine_opt.state_dict(), ref_opt.state_dict()
        assert mine_sd["step"] == ref_sd["step"] == steps
        for key, st in ref_sd["state"].items():
            for name, t in st.items():
                _same(mine_sd["state"][key][name], t, f"{what}: state {key}.{name}")
    return caught


def _check_periodic(rank, world_size, backend):
    dev = _device(rank, backend)
    size = 2 if world_size == 4 else 1
    sub, _ = dist.new_subgroups(group_size=size)
    configs = [  # period, warmup, group (None: world), local optimizer, through the wrapper?
        (2, 0, None, "sgd", True),
        (3, 2, None, "adam", True),
        (1, 4, None, "sgd", True),  # period 1 warns
        (4, 1, sub, "sgd", True),
        (3, 1, None, "adam", False),  # averager.average_parameters(model.parameters())
    ]
    for period, warmup, group, kind, wrapped in configs:
        group_size = world_size if group is None else size
        pair = lambda: (my_avg.PeriodicModelAverager(period, warmup, group),  # noqa: E731
                        up_avg.PeriodicModelAverager(period, warmup, group))
        expected = lambda s: group_size if _periodic_expected(s, period, warmup) else None  # noqa: E731
        caught = _run_schedule(rank, world_size, dev, pair, expected, STEPS, kind, wrapped,
                               f"periodic(period={period}, warmup={warmup}, group size {group_size})")
        assert len(caught) == (2 if period == 1 else 0)
        if caught:
            assert caught[0] == caught[1] and caught[0][2] == __file__  # stacklevel: the caller
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_periodic_averager_schedule_and_parity(ranks, world_size, backend):
    """PostLocalSGDOptimizer + PeriodicModelAverager average exactly at warm-up + k*period, in
    the right group, and equal upstream bit for bit (params and optimizer state), with SGD and
    Adam, in the world and in subgroups, wrapped or called directly."""
    assert all(ranks(world_size, backend).run(_check_periodic, backend))


# ---------------------------------------------------------------------------
# HierarchicalModelAverager
# ---------------------------------------------------------------------------

HIERARCHIES = {  # (period -> group size, warmup); keys need not be sorted (upstream does not check)
    1: [({2: 1}, 0), ({1: 1, 3: 1}, 2)],
    2: [({2: 1, 4: 2}, 0), ({3: 1, 2: 2}, 1)],
    3: [({2: 1, 3: 3}, 1), ({2: 3}, 3)],
    4: [({2: 2, 4: 4}, 0), ({2: 1, 4: 2, 8: 4}, 1), ({4: 2, 2: 4}, 0)],
}


def _hierarchical_expected(step, levels, warmup):
    if step < warmup:
        return None
    for period in reversed(list(levels)):
        if step % period == 0:
            return levels[period]
    return None


def _check_hierarchical(rank, world_size, backend):
    dev = _device(rank, backend)
    for i, (levels, warmup) in enumerate(HIERARCHIES[world_size]):
        levels = OrderedDict(levels)
        pair = lambda: (my_avg.HierarchicalModelAverager(levels, warmup),  # noqa: E731
                        up_hier.HierarchicalModelAverager(levels, warmup))
        expected = lambda s: _hierarchical_expected(s, levels, warmup)  # noqa: E731
        caught = _run_schedule(rank, world_size, dev, pair, expected, STEPS, "sgd", i % 2 == 0,
                               f"hierarchical({dict(levels)}, warmup={warmup})")
        assert caught == []
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_hierarchical_averager_schedule_and_parity(ranks, world_size, backend):
    """HierarchicalModelAverager averages at each step in the group of the largest (last-listed)
    period dividing it, after warm-up, and equals upstream bit for bit; two and three levels at
    world size 4, a size-1 lower level elsewhere, unsorted periods as upstream allows."""
    assert all(ranks(world_size, backend).run(_check_hierarchical, backend))


# ---------------------------------------------------------------------------
# save / resume
# ---------------------------------------------------------------------------

def _check_resume(rank, world_size, backend):
    dev = _device(rank, backend)
    total, cut = 9, 4
    lower = 2 if world_size == 4 else 1
    averagers = {
        "periodic": (lambda m: m.PeriodicModelAverager(3, 2), my_avg, up_avg),
        "hierarchical": (lambda m: m.HierarchicalModelAverager(OrderedDict({2: lower, 3: world_size}), 1),
                         my_avg, up_hier),
    }
    for name, (make, mine_mod, ref_mod) in averagers.items():
        model = _net(dev)
        # upstream, uninterrupted: the reference trajectory
        ref_model = copy.deepcopy(model)
        ref_opt = UpPostLocalSGDOptimizer(torch.optim.Adam(ref_model.parameters(), lr=0.01), make(ref_mod))
        ref_traj, ref_cut_sd = [], None
        for step in range(total):
            ref_opt.zero_grad()
            _backward(ref_model, rank, step, dev)
            ref_opt.step()
            ref_traj.append([p.detach().clone() for p in ref_model.parameters()])
            if step + 1 == cut:
                ref_cut_sd = copy.deepcopy(ref_opt.state_dict())

        # mine: stop at `cut`, checkpoint through torch.save, resume in fresh objects
        mine_model = copy.deepcopy(model)
        mine_opt = PostLocalSGDOptimizer(po.Adam(mine_model.parameters(), lr=0.01), make(mine_mod))
        for step in range(cut):
            mine_opt.zero_grad()
            _backward(mine_model, rank, step, dev)
            mine_opt.step()
        buf = io.BytesIO()
        torch.save({"model": mine_model.state_dict(), "optim": mine_opt.state_dict()}, buf)
        sd = mine_opt.state_dict()
        assert sd.keys() == ref_cut_sd.keys() and sd["step"] == ref_cut_sd["step"] == cut
        assert sd["param_groups"] == ref_cut_sd["param_groups"]
        for key, st in ref_cut_sd["state"].items():
            for k, t in st.items():
                _same(sd["state"][key][k], t, f"{name}: checkpoint state {key}.{k}")
        del mine_model, mine_opt
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)

        def resumed(ckpt_optim, mod=mine_mod, local=po.Adam, wrapper=PostLocalSGDOptimizer):
            m = _net(dev)
            m.load_state_dict(ckpt["model"])
            o = wrapper(local(m.parameters(), lr=0.01), make(mod))
            _, caught = _warnings_of(lambda: o.load_state_dict(ckpt_optim))
            return m, o, caught

        mine_model, mine_opt, caught = resumed(ckpt["optim"])
        assert caught == [] and mine_opt.averager.step == cut
        # deliberate difference from upstream: the wrapper's groups stay the local optimizer's
        assert mine_opt.param_groups is mine_opt.optim.param_groups
        for step in range(cut, total):
            before = _storage(mine_model)
            mine_opt.zero_grad()
            _backward(mine_model, rank, step, dev)
            mine_opt.step()
            _same_params(mine_model.parameters(), ref_traj[step], f"{name}: resumed, step {step}")
            assert (_storage(mine_model) != before) == _resume_expected(name, step, lower, world_size)

        # a checkpoint without the counter: same warning as upstream, counter back to 0, and
        # both continue identically (warm-up starts over)
        no_step = {k: v for k, v in ckpt["optim"].items() if k != "step"}
        mine_model, mine_opt, mine_caught = resumed(no_step)
        ref_model, ref_opt, ref_caught = resumed(copy.deepcopy(no_step), ref_mod, torch.optim.Adam,
                                                  UpPostLocalSGDOptimizer)
        assert len(mine_caught) == 1 and mine_caught == ref_caught, (mine_caught, ref_caught)
        assert mine_caught[0][0] is UserWarning and mine_caught[0][2] == __file__
        assert mine_opt.averager.step == ref_opt.averager.step == 0
        for step in range(cut, total):
            for m, o in ((mine_model, mine_opt), (ref_model, ref_opt)):
                o.zero_grad()
                _backward(m, rank, step, dev)
                o.step()
            _same_params(mine_model.parameters(), ref_model.parameters(), f"{name}: reset counter, step {step}")
        assert mine_opt.averager.step == ref_opt.averager.step == total - cut
    return True


def _resume_expected(name, step, lower, world_size):
    """Whether the resumed run averages at `step` (the averagers built in _check_resume)."""
    if name == "periodic":
        return _periodic_expected(step, 3, 2)
    return _hierarchical_expected(step, OrderedDict({2: lower, 3: world_size}), 1) is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_save_resume_continues_bit_identically(ranks, world_size, backend):
    """A checkpoint taken mid-run (torch.save/torch.load) holds upstream's layout and the
    averager's counter; resuming in fresh objects continues on upstream's uninterrupted
    trajectory bit for bit, averaging on schedule. A checkpoint without the counter warns
    exactly like upstream, resets it to 0 and then tracks upstream's reset run bit for bit."""
    assert all(ranks(world_size, backend).run(_check_resume, backend))


# ---------------------------------------------------------------------------
# the DDP comm hook
# ---------------------------------------------------------------------------

def _check_hook(rank, world_size, backend):
    dev = _device(rank, backend)
    lower = world_size // 2 if world_size % 2 == 0 else 1
    sub, _ = dist.new_subgroups(group_size=lower)
    configs = [  # start_localSGD_iter, subgroup, post_local_gradient_allreduce, global group
        (3, sub, True, None),
        (2, None, False, dist.group.WORLD),
        (0, sub, True, None),
    ]
    steps = 7
    for start, subgroup, post_local, group in configs:
        what = f"hook(start={start}, post_local={post_local})"
        model = _net(dev)
        ddp_kw = dict(bucket_cap_mb=100 / 2**20)  # several buckets after the first iteration
        if backend == "nccl":
            ddp_kw["device_ids"] = [rank]
        mine_ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model), **ddp_kw)
        ref_ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model), **ddp_kw)
        mine_state = my_hook.PostLocalSGDState(group, subgroup, start, post_local)
        ref_state = up_hook.PostLocalSGDState(group, subgroup, start, post_local)
        mine_ddp.register_comm_hook(mine_state, my_hook.post_localSGD_hook)
        ref_ddp.register_comm_hook(ref_state, up_hook.post_localSGD_hook)
        mine_opt = PostLocalSGDOptimizer(po.SGD(mine_ddp.parameters(), lr=0.05, momentum=0.9),
                                         my_avg.PeriodicModelAverager(2, start))
        ref_opt = UpPostLocalSGDOptimizer(torch.optim.SGD(ref_ddp.parameters(), lr=0.05, momentum=0.9),
                                          up_avg.PeriodicModelAverager(2, start))
        for step in range(steps):
            for ddp, opt in ((mine_ddp, mine_opt), (ref_ddp, ref_opt)):
                opt.zero_grad()
                _backward(ddp, rank, step, dev)
            grads = [p.grad for p in mine_ddp.parameters()]
            _same_params(grads, [p.grad for p in ref_ddp.parameters()], f"{what}: grads, step {step}")
            assert mine_state.iter == ref_state.iter == min(step + 1, start), (step, mine_state.iter)
            if step < start:
                want = [list(range(world_size))]
            elif post_local:
                want = _chunks(world_size, lower)
            else:
                want = [[r] for r in range(world_size)]
            assert _equal_ranks(grads, world_size) == want, f"{what}: gradient sync at step {step}"
            mine_opt.step()
            ref_opt.step()
            _same_params(mine_ddp.parameters(), ref_ddp.parameters(), f"{what}: params, step {step}")
        assert mine_state.subgroup is subgroup  # never replaced when given (or when unused)
    return True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_comm_hook_with_ddp_parity(ranks, world_size, backend):
    """post_localSGD_hook under DDP (several buckets) equals upstream's hook bit for bit in
    gradients and parameters each step: global averaging before start_localSGD_iter, then
    averaging within the subgroup, or none; the counter advances once per iteration and stops
    at start_localSGD_iter, like upstream's."""
    assert all(ranks(world_size, backend).run(_check_hook, backend))


# ---------------------------------------------------------------------------
# bad input and edge behaviour
# ---------------------------------------------------------------------------

class _FakeBucket:
    """What the hook reads from a GradBucket."""

    def __init__(self, values, last):
        self._buffer, self._last = values, last

    def buffer(self):
        return self._buffer

    def is_last(self):
        return self._last


def _check_bad_inputs(rank, world_size):
    ws = world_size
    cases = {
        "periodic period 0": lambda m: m.PeriodicModelAverager(0),
        "periodic period -2": lambda m: m.PeriodicModelAverager(-2, 3),
        "periodic warmup -1": lambda m: m.PeriodicModelAverager(2, -1),
        "periodic both bad": lambda m: m.PeriodicModelAverager(0, -1),
        "periodic period 1 warns": lambda m: m.PeriodicModelAverager(1),
        "hier None": lambda m: m.HierarchicalModelAverager(None),
        "hier default": lambda m: m.HierarchicalModelAverager(),
        "hier empty": lambda m: m.HierarchicalModelAverager(OrderedDict()),
        "hier period 0": lambda m: m.HierarchicalModelAverager({0: ws}),
        "hier first period -3": lambda m: m.HierarchicalModelAverager({-3: 1, 4: ws}),
        "hier last period 1 warns": lambda m: m.HierarchicalModelAverager({1: ws}),
        "hier last size wrong": lambda m: m.HierarchicalModelAverager({2: 1, 4: ws + 1}),
        "hier warns then last size wrong": lambda m: m.HierarchicalModelAverager({1: ws + 1}),
        "hier size 0": lambda m: m.HierarchicalModelAverager({2: 0, 4: ws}),
        "hier size too big": lambda m: m.HierarchicalModelAverager({2: ws + 1, 4: ws}),
        "hier warmup -1": lambda m: m.HierarchicalModelAverager({2: 1, 4: ws}, -1),
        "hier size beats warmup": lambda m: m.HierarchicalModelAverager({2: 0, 4: ws}, -1),
        "hier not divisible": lambda m: m.HierarchicalModelAverager({2: 2, 4: 3}) if ws == 3 else
                                        m.HierarchicalModelAverager({2: 1, 3: 3, 4: 4}) if ws == 4 else None,
        "hier bad middle level": lambda m: m.HierarchicalModelAverager({2: 1, 3: 3, 6: 4}) if ws == 4 else
                                               m.HierarchicalModelAverager({2: 1, 4: ws}),
        "abstract base": lambda m: m.ModelAverager(),
        "plain tensor input": lambda m: m.get_params_to_average([torch.zeros(2)]),
        "nothing to average": lambda m: m.average_parameters(iter([]), None),
    }
    for name, build in cases.items():
        groups_before = _n_groups()
        mine = _outcome(lambda: build(my_avg))
        mine_new_groups = _n_groups() - groups_before
        ref = _outcome(lambda: build(up_hier if name.startswith("hier") else
                                     (up_avg if name.startswith(("periodic", "abstract")) else up_utils)))
        assert mine == ref, f"{name}: mine {mine}, upstream {ref}"
        if mine[0] != "ok":
            assert mine_new_groups == 0, f"{name}: created {mine_new_groups} groups before raising"
        for w in mine[1] if mine[0] == "ok" else []:
            assert w[2] == __file__, f"{name}: warning points at {w[2]}"

    # the wrapper's load_state_dict: the local optimizer refuses first, the counter is untouched
    for wrapper, local, mod in ((PostLocalSGDOptimizer, po.SGD, my_avg), (UpPostLocalSGDOptimizer, torch.optim.SGD, up_avg)):
        m = _net(torch.device("cpu"))
        o = wrapper(local(m.parameters(), lr=0.1), mod.PeriodicModelAverager(2))
        o.averager.step = 5
        bad = {"state": {}, "param_groups": [], "step": 9}
        with pytest.raises(ValueError, match="different number of parameter groups"):
            o.load_state_dict(bad)
        assert o.averager.step == 5
        assert repr(o) == repr(o.optim) and o.state is o.optim.state

    # the hook on hand-made buckets: counting, the no-allreduce future, lazy default subgroup
    outs = []
    for mod in (my_hook, up_hook):
        st = mod.PostLocalSGDState(None, None, 2)
        seen = []
        for last in (False, True, False, True):
            t = torch.full((3,), float(rank + 1))
            seen.append((mod.post_localSGD_hook(st, _FakeBucket(t, last)).wait().clone(), st.iter))
        st_local = mod.PostLocalSGDState(None, None, 0, post_local_gradient_allreduce=False)
        t = torch.full((3,), float(rank))
        fut = mod.post_localSGD_hook(st_local, _FakeBucket(t, True))
        assert fut.wait() is t and st_local.iter == 0 and st_local.subgroup is None
        # subgroup None: created inside the hook with the per-machine default, which needs CUDA
        lazy = _outcome(lambda: mod.post_localSGD_hook(st, _FakeBucket(torch.ones(3), True)).wait())
        outs.append((seen, lazy, st.iter))
    (mine_seen, mine_lazy, mine_iter), (ref_seen, ref_lazy, ref_iter) = outs
    assert [s[1] for s in mine_seen] == [s[1] for s in ref_seen] == [0, 1, 1, 2]
    for (a, _), (b, _) in zip(mine_seen, ref_seen, strict=True):
        _same(a, b, "hook on a fake bucket")
    assert mine_iter == ref_iter == 2
    if not torch.cuda.is_available():
        assert mine_lazy == ref_lazy and mine_lazy[0] is ValueError, (mine_lazy, ref_lazy)
    return True


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_bad_inputs_like_upstream(ranks, world_size):
    """Invalid periods, warm-ups, hierarchies (empty, non-positive first period, last size not the
    world size, sizes that do not divide it), non-parameter inputs and empty inputs raise the same
    exception type and message as upstream, warnings match upstream's text and point at the caller,
    and nothing (no process group) is created before raising. Also: the wrapper's load_state_dict
    leaves the counter alone when the local optimizer refuses the dict, and the hook counts once per
    last bucket, passes gradients through untouched when post-local allreduce is off, and
    creates its default subgroup lazily (which refuses without CUDA) exactly like upstream."""
    assert all(ranks(world_size).run(_check_bad_inputs))
