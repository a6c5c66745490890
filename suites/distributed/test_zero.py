"""optparity's ZeroRedundancyOptimizer against torch's, on real process groups.

Every check is bitwise (optparity.harness.bitwise.compare): our ZeRO, torch's ZeRO and plain
single-process optimizers are fed identical parameters and identical averaged gradients in the
same ranks, and must agree on every parameter and state tensor after every step.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.join import Join
from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZeRO
from torch.nn.parallel import DistributedDataParallel as DDP

import optparity.optim as oo
from optparity.distributed import functional_optim
from optparity.distributed.zero_redundancy_optimizer import (
    ZeroRedundancyOptimizer as ZeRO,
    hook_with_zero_step,
    hook_with_zero_step_interleaved,
)
from optparity.harness.bitwise import compare

WORLD_SIZES = [1, 2, 3, 4]
BACKENDS = ["gloo", "nccl"]

# A few Linear-like layers; (4, 4) and (16,) tie on size, to pin the tie-breaking order.
SHAPES = [(8, 5), (8,), (6, 8), (6,), (4, 4), (16,), (3, 6), (3,)]
FROZEN = (1, 4)  # indices whose requires_grad is switched off at step 2 and back on at step 4

# Non-default hyperparameters, so every branch that state depends on is exercised.
HYPER = {
    "Adam": dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.05),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.01),
    "Adamax": dict(lr=0.02, weight_decay=0.01),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05)),
}
ALGOS = sorted(HYPER)


# ---------------------------------------------------------------------------
# helpers (run inside the ranks)
# ---------------------------------------------------------------------------

def _device(rank: int, backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _skip_backend(ranks, ws, backend):
    return ranks(ws, backend)  # skips (with the reason) when the backend is unavailable


def _make_params(device, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes]


def _clone(params):
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def _groups(params, algo):
    lr = HYPER[algo]["lr"]
    return [
        {"params": params[0:3], "lr": lr * 0.5},
        {"params": params[3:6]},
        {"params": params[6:8], "maximize": True},
    ]


def _avg_grads(step, members, device, shapes=SHAPES, seed=1000):
    """The gradient each member rank would compute at `step`, averaged in a fixed order (so
    every rank gets the same bits without communication)."""
    total = None
    for r in members:
        gen = torch.Generator().manual_seed(seed + 97 * step + r)
        g = [torch.randn(s, generator=gen) for s in shapes]
        total = g if total is None else [a + b for a, b in zip(total, g)]
    return [(t / len(members)).to(device) for t in total]


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone() if p.requires_grad else None


def _assert_params_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        diff = compare(a.detach(), b.detach())
        assert diff is None, f"{what}: param {i}: {diff.describe()}"


def _assert_same(a, b, path="state_dict"):
    """Deep equality; tensors bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        diff = compare(a, b)
        assert diff is None, f"{path}: {diff.describe()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: {type(a)} vs {type(b)}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def _assert_same_across_ranks(params, group):
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, flat, group=group)
    for r, other in enumerate(gathered):
        diff = compare(other, flat)
        assert diff is None, f"parameters differ between this rank and group rank {r}: {diff.describe()}"


def _assert_bucket_views(zero):
    """With parameters_as_bucket_view every trainable parameter lives inside one bucket."""
    storages = {b.untyped_storage().data_ptr() for dev in zero._buckets for b in dev}
    for group in zero.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                assert p.untyped_storage().data_ptr() in storages, "parameter is not a bucket view"


def _raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def _same_error(ours, theirs, expected_type):
    got, want = _raised(ours), _raised(theirs)
    assert want is not None and want[0] is expected_type, f"torch did not raise {expected_type}: {want}"
    assert got == want, f"ours raised {got}, torch raised {want}"


def _bcast_object(obj, src_group_rank, group):
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, src_group_rank), group=group)
    return holder[0]


# ---------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------

PARTITION_CASES = [
    # (shapes, group sizes)
    (SHAPES, [3, 3, 2]),
    ([(10,)] * 5 + [(1,)], [6]),  # ties everywhere
    ([(2,), (100,), (7, 7), (3,), (49,), (1,)], [1, 2, 3]),  # the size counter spans groups
    ([(5,), (2, 2)], [2]),  # more ranks than parameters: empty shards
    ([(3, 3), (9,), (1, 9), (9, 1)], [1, 1, 1, 1]),
]


def _ix(params, p):
    """Position of tensor `p` in `params`, by identity."""
    return next(i for i, q in enumerate(params) if q is p)


def _index_partition(zero, params):
    where = {p: i for i, p in enumerate(params)}
    return [[[where[p] for p in g["params"]] for g in groups] for groups in zero._partition_parameters()]


def _hyper_only(group):
    return {k: v for k, v in group.items() if k != "params"}


def _run_partition(rank, ws, backend):
    device = _device(rank, backend)
    out = []
    for case, (shapes, sizes) in enumerate(PARTITION_CASES):
        params = _make_params(device, seed=case, shapes=shapes)
        # fresh group dicts each: optimizers write their defaults into the caller's dicts
        ours = ZeRO(_regroup(params, sizes), oo.SGD, lr=0.5)
        theirs = TorchZeRO(_regroup(params, sizes), torch.optim.SGD, lr=0.5)

        mine = _index_partition(ours, params)
        assert mine == _index_partition(theirs, params), f"case {case}: partition differs from torch"
        for r in range(ws):
            for a, b in zip(ours._partition_parameters()[r], theirs._partition_parameters()[r]):
                assert _hyper_only(a) == _hyper_only(b), f"case {case} rank {r}: group settings differ"
        # disjoint and complete, group by group
        for g in range(len(sizes)):
            owned = [i for r in range(ws) for i in mine[r][g]]
            first = sum(sizes[:g])
            assert sorted(owned) == list(range(first, first + sizes[g])), f"case {case} group {g}: {owned}"
        # introspection maps
        assert {_ix(params, p): r for p, r in ours._param_to_rank.items()} == \
               {_ix(params, p): r for p, r in theirs._param_to_rank.items()}
        assert {_ix(params, p): i for p, i in ours._param_to_index.items()} == \
               {_ix(params, p): i for p, i in theirs._param_to_index.items()}
        assert [_ix(params, p) for p in ours._index_to_param] == list(range(len(params)))
        # the local optimizer holds exactly this rank's shard
        local = [_ix(params, p) for g in ours.optim.param_groups for p in g["params"]]
        assert local == [i for g in mine[rank] for i in g]
        assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()

        # explicit partition (single group only), as DDP overlap uses
        if len(sizes) == 1:
            manual = [params[r::ws] for r in range(ws)]
            ours._clear_cache()
            theirs._clear_cache()
            got = ours._partition_parameters(manual)
            want = theirs._partition_parameters(manual)
            assert [[g["params"] for g in gs] for gs in got] == [[g["params"] for g in gs] for gs in want]

        # bucket views: same bucket layout and contents as torch, parameters are views
        a, b = _clone(params), _clone(params)
        ours_b = ZeRO(_regroup(a, sizes), oo.SGD, parameters_as_bucket_view=True, lr=0.5)
        theirs_b = TorchZeRO(_regroup(b, sizes), torch.optim.SGD, parameters_as_bucket_view=True, lr=0.5)
        assert len(ours_b._buckets) == len(theirs_b._buckets) == 1
        for x, y in zip(ours_b._buckets[0], theirs_b._buckets[0]):
            assert compare(x, y) is None
        _assert_bucket_views(ours_b)
        _assert_params_equal(a, params, "bucket view changed values")
        out.append(mine)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_partition_matches_torch(ranks, world_size, backend):
    """Sorted-greedy partition (one counter across groups, largest first, ties to the lowest
    rank), explicit partitions, introspection maps and bucket layout equal torch's; shards are
    disjoint and complete; every rank computes the same partition."""
    results = _skip_backend(ranks, world_size, backend).run(_run_partition, backend)
    assert all(r == results[0] for r in results)


def _regroup(params, sizes):
    groups, start = [], 0
    for g, n in enumerate(sizes):
        groups.append({"params": params[start:start + n], "lr": 0.1 * (g + 1)})
        start += n
    return groups


# ---------------------------------------------------------------------------
# training parity: all eight algorithms, bucket views, groups, schedulers, frozen params,
# state dicts (consolidate, cross-load both ways, plain optimizers)
# ---------------------------------------------------------------------------

N_BEFORE, N_AFTER = 6, 4


def _parity_one(algo, bucket_view, group, members, rank_in_group, device):
    hp = HYPER[algo]
    base = _make_params(device)

    def zero(cls, impl, params):
        return impl(_groups(params, algo), cls, process_group=group,
                    parameters_as_bucket_view=bucket_view, **hp)

    torch_cls, ours_cls = getattr(torch.optim, algo), getattr(oo, algo)
    runs = {}  # name -> (optimizer, params, scheduler)
    for name, impl, cls in [("ours", ZeRO, ours_cls), ("ours[torch.optim]", ZeRO, torch_cls),
                            ("torch ZeRO", TorchZeRO, torch_cls)]:
        p = _clone(base)
        opt = zero(cls, impl, p)
        runs[name] = (opt, p)
    ref_p, reft_p = _clone(base), _clone(base)
    ref = ours_cls(_groups(ref_p, algo), **hp)
    runs["torch.optim"] = (torch_cls(_groups(reft_p, algo), **hp), reft_p)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
              for o in [ref] + [o for o, _ in runs.values()]]

    def step_all(t, with_sched):
        for i in FROZEN:
            flag = not (2 <= t < 4)
            for params in [ref_p] + [p for _, p in runs.values()]:
                params[i].requires_grad_(flag)
        grads = _avg_grads(t, members, device)
        _set_grads(ref_p, grads)
        ref.step()
        for name, (opt, params) in runs.items():
            _set_grads(params, grads)
            opt.step()
            _assert_params_equal(params, ref_p, f"{algo} bucket_view={bucket_view} step {t}: {name}")
        if with_sched:
            for s in scheds:
                s.step()
        _assert_same_across_ranks(runs["ours"][1], group)
        if bucket_view:
            _assert_bucket_views(runs["ours"][0])
            for x, y in zip(runs["ours"][0]._buckets[0], runs["torch ZeRO"][0]._buckets[0]):
                assert compare(x, y) is None, "bucket contents differ from torch's"

    for t in range(N_BEFORE):
        step_all(t, with_sched=True)
    # the scheduler's learning rates reached our param_groups and the local optimizer
    ours = runs["ours"][0]
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [g["lr"] for g in ours.optim.param_groups] == [g["lr"] for g in ours._partition_parameters()[rank_in_group]]

    # -- consolidate on the last group rank
    to = len(members) - 1
    theirs = runs["torch ZeRO"][0]
    ours.consolidate_state_dict(to=to)
    theirs.consolidate_state_dict(to=to)
    if rank_in_group == to:
        sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
        _assert_same(sd_ours, ref.state_dict(), "ours vs unsharded")
        _assert_same(sd_theirs, ref.state_dict(), "torch ZeRO vs unsharded")
    else:
        sd_ours = sd_theirs = None
        _same_error(ours.state_dict, theirs.state_dict, RuntimeError)
    sd_ours = _bcast_object(sd_ours, to, group)
    sd_theirs = _bcast_object(sd_theirs, to, group)
    sd_plain = ref.state_dict()

    # -- cross-load into fresh optimizers over the current parameters
    loaded = {}
    p = _clone(ref_p)
    o = zero(torch_cls, TorchZeRO, p)
    o.load_state_dict(copy.deepcopy(sd_ours))
    loaded["ours sd -> torch ZeRO"] = (o, p)
    p = _clone(ref_p)
    o = zero(ours_cls, ZeRO, p)
    argument, snapshot = copy.deepcopy(sd_theirs), copy.deepcopy(sd_theirs)
    o.load_state_dict(argument)
    _assert_same(argument, snapshot, "load_state_dict changed its argument")
    loaded["torch ZeRO sd -> ours"] = (o, p)
    p = _clone(ref_p)
    o = zero(ours_cls, ZeRO, p)
    o.load_state_dict(copy.deepcopy(sd_plain))
    loaded["plain sd -> ours"] = (o, p)
    p = _clone(ref_p)
    o = ours_cls(_groups(p, algo))
    o.load_state_dict(copy.deepcopy(sd_ours))
    loaded["ours sd -> plain optparity"] = (o, p)
    p = _clone(ref_p)
    o = torch_cls(_groups(p, algo))
    o.load_state_dict(copy.deepcopy(sd_ours))
    loaded["ours sd -> plain torch.optim"] = (o, p)
    runs.update(loaded)

    for t in range(N_BEFORE, N_BEFORE + N_AFTER):
        step_all(t, with_sched=False)
    _assert_same(argument, snapshot, "stepping after load_state_dict changed the loaded dict")

    # the loaded ZeROs hold the right shards of the state
    for name in ("torch ZeRO sd -> ours", "plain sd -> ours"):
        z = runs[name][0]
        z.consolidate_state_dict(to=0)
        if rank_in_group == 0:
            _assert_same(z.state_dict(), ref.state_dict(), f"{name}: consolidated after training")


def _run_parity(rank, ws, backend, subgroup, algos, bucket_views):
    device = _device(rank, backend)
    if subgroup:
        # ranks 1.. form the group (group ranks differ from global ranks); rank 0 stays out
        members = list(range(1, ws))
        group = dist.new_group(members)
        if rank not in members:
            return None
    else:
        members, group = list(range(ws)), dist.group.WORLD
    rank_in_group = dist.get_rank(group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler/step-order chatter
        for algo in algos:
            for bv in bucket_views:
                _parity_one(algo, bv, group, members, rank_in_group, device)
    return len(algos) * len(bucket_views)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_training_parity_all_algorithms(ranks, world_size, backend):
    """For the eight algorithms, with and without bucket views, three parameter groups, a
    StepLR scheduler and parameters frozen then unfrozen mid-run: our ZeRO (over optparity and
    over torch.optim classes) equals torch's ZeRO, a plain optparity optimizer and a plain
    torch.optim optimizer after every step, and across ranks. Consolidated state dicts equal the
    unsharded optimizer's; state dicts cross-load ours<->torch ZeRO<->plain and training then
    continues bit-identically; load_state_dict never changes its argument."""
    pool = _skip_backend(ranks, world_size, backend)
    done = pool.run(_run_parity, backend, False, ALGOS, [False, True], timeout=300)
    assert done == [16] * world_size


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_training_parity_subgroup(ranks, world_size):
    """The same on a dist.new_group of ranks 1.. (rank 0 does not take part), so group ranks
    and global ranks differ in broadcasts and consolidation."""
    done = ranks(world_size).run(_run_parity, "gloo", True, ALGOS, [False, True], timeout=300)
    assert done == [None] + [16] * (world_size - 1)


# ---------------------------------------------------------------------------
# add_param_group
# ---------------------------------------------------------------------------

EXTRA_SHAPES = [(5,), (2, 3), (7,)]


def _run_add_group(rank, ws, backend):
    device = _device(rank, backend)
    for algo in ("Adam", "SGD", "Rprop"):
        hp = HYPER[algo]
        for bv in (False, True):
            base = _make_params(device)
            extra = _make_params(device, seed=5, shapes=EXTRA_SHAPES)
            runs = {}
            for name, impl, cls in [("ours", ZeRO, getattr(oo, algo)),
                                    ("torch ZeRO", TorchZeRO, getattr(torch.optim, algo))]:
                p, e = _clone(base), _clone(extra)
                runs[name] = (impl(_groups(p, algo), cls, parameters_as_bucket_view=bv, **hp), p + e)
            p, e = _clone(base), _clone(extra)
            ref = getattr(oo, algo)(_groups(p, algo), **hp)
            ref_p = p + e
            shapes = SHAPES + EXTRA_SHAPES
            for t in range(6):
                if t == 3:
                    for opt, params in list(runs.values()) + [(ref, ref_p)]:
                        opt.add_param_group({"params": params[len(SHAPES):], "lr": 0.03})
                    ours, theirs = runs["ours"][0], runs["torch ZeRO"][0]
                    assert _index_partition(ours, runs["ours"][1]) == _index_partition(theirs, runs["torch ZeRO"][1])
                    if bv:
                        _assert_bucket_views(ours)
                grads = _avg_grads(t, range(ws), device, shapes=shapes)
                n = len(SHAPES) if t < 3 else len(shapes)
                _set_grads(ref_p[:n], grads[:n])
                ref.step()
                for name, (opt, params) in runs.items():
                    _set_grads(params[:n], grads[:n])
                    opt.step()
                    _assert_params_equal(params, ref_p, f"{algo} bv={bv} step {t}: {name}")
            ours = runs["ours"][0]
            ours.consolidate_state_dict(to=0)
            if rank == 0:
                _assert_same(ours.state_dict(), ref.state_dict(), f"{algo} after add_param_group")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_add_param_group(ranks, world_size, backend):
    """A group added mid-run is partitioned after the old ones exactly like torch's ZeRO, the
    local optimizers gain it, buckets are rebuilt, and training stays bit-identical."""
    _skip_backend(ranks, world_size, backend).run(_run_add_group, backend)


# ---------------------------------------------------------------------------
# uneven inputs: Join with DDP
# ---------------------------------------------------------------------------

def _model(device, wide=False):
    torch.manual_seed(3)
    h1, h2 = (40, 30) if wide else (8, 8)
    return nn.Sequential(nn.Linear(5, h1), nn.Tanh(), nn.Linear(h1, h2), nn.Tanh(), nn.Linear(h2, 3)).to(device)


def _join_train(impl, optim_cls, bucket_view, rank, ws, device, hp):
    model = _model(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    zero = impl(ddp.parameters(), optim_cls, parameters_as_bucket_view=bucket_view, **hp)
    steps = []
    zero.register_step_post_hook(lambda *_: steps.append(1))
    gen = torch.Generator().manual_seed(50 + rank)
    n_batches = 3 + rank  # uneven: rank 0 runs out first
    with Join([ddp, zero]):
        for _ in range(n_batches):
            x = torch.randn(4, 5, generator=gen).to(device)
            y = torch.randn(4, 3, generator=gen).to(device)
            zero.zero_grad()
            nn.functional.mse_loss(ddp(x), y).backward()
            zero.step()
    # a rank that ran out kept stepping (through the join hook) until the last rank finished
    assert len(steps) == 3 + ws - 1, (len(steps), ws)
    return [p.detach().clone() for p in model.parameters()]


def _run_join(rank, ws, backend):
    device = _device(rank, backend)
    out = []
    for algo in ("Adam", "SGD", "RMSprop"):
        for bv in (False, True):
            hp = HYPER[algo]
            ours = _join_train(ZeRO, getattr(oo, algo), bv, rank, ws, device, hp)
            theirs = _join_train(TorchZeRO, getattr(torch.optim, algo), bv, rank, ws, device, hp)
            _assert_params_equal(ours, theirs, f"Join {algo} bv={bv}: ours vs torch ZeRO")
            _assert_same_across_ranks(ours, dist.group.WORLD)
            out.append(torch.cat([p.reshape(-1) for p in ours]).cpu())
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_join_uneven_inputs_with_ddp(ranks, world_size, backend):
    """Ranks with fewer batches shadow the remaining steps through ZeRO's join hook next to
    DDP's; the result is bit-identical to torch's ZeRO under the same Join, on every rank."""
    results = _skip_backend(ranks, world_size, backend).run(_run_join, backend)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert compare(a, b) is None


# ---------------------------------------------------------------------------
# overlap_with_ddp
# ---------------------------------------------------------------------------

def _run_overlap_refused(rank, ws):
    model = _model(torch.device("cpu"))
    ddp = DDP(model)
    hp = dict(lr=0.01)
    ours = ZeRO(ddp.parameters(), oo.Adam, overlap_with_ddp=True, **hp)
    theirs = TorchZeRO(ddp.parameters(), torch.optim.Adam, overlap_with_ddp=True, **hp)
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook as torch_hooks
    hook = default_hooks.allreduce_hook
    for ours_fn, torch_fn in [(hook_with_zero_step, torch_hooks.hook_with_zero_step),
                              (hook_with_zero_step_interleaved, torch_hooks.hook_with_zero_step_interleaved)]:
        _same_error(lambda: ours_fn(hook, ddp, ours), lambda: torch_fn(hook, ddp, theirs), RuntimeError)
        msg = _raised(lambda: ours_fn(hook, ddp, ours))[1]
        assert "Gloo" in msg
        # a ZeRO without overlap_with_ddp is refused first
        plain_ours = ZeRO(_clone(list(model.parameters())), oo.Adam, **hp)
        plain_theirs = TorchZeRO(_clone(list(model.parameters())), torch.optim.Adam, **hp)
        _same_error(lambda: ours_fn(hook, ddp, plain_ours), lambda: torch_fn(hook, ddp, plain_theirs), ValueError)
    # before DDP has finalised its buckets: step is a no-op, state dicts are refused
    assert ours.step() is None
    assert ours._optim_constructor is functional_optim.FunctionalAdam  # optparity's, not torch's
    _same_error(lambda: ours.consolidate_state_dict(), lambda: theirs.consolidate_state_dict(), RuntimeError)
    _same_error(lambda: ours.state_dict(), lambda: theirs.state_dict(), RuntimeError)
    _same_error(lambda: ours.add_param_group({"params": [torch.zeros(2, requires_grad=True)]}),
                lambda: theirs.add_param_group({"params": [torch.zeros(2, requires_grad=True)]}), RuntimeError)
    _same_error(lambda: ZeRO(_clone(list(model.parameters())), torch.optim.LBFGS, overlap_with_ddp=True),
                lambda: TorchZeRO(_clone(list(model.parameters())), torch.optim.LBFGS, overlap_with_ddp=True),
                ValueError)


@pytest.mark.parametrize("world_size", [1, 2])
def test_overlap_with_ddp_refuses_gloo(ranks, world_size):
    """hook_with_zero_step(_interleaved) refuse Gloo with torch's RuntimeError (and a ZeRO built
    without overlap_with_ddp with its ValueError); before DDP's buckets are final, step() is a
    no-op and state-dict calls raise like torch's."""
    ranks(world_size).run(_run_overlap_refused)


@contextlib.contextmanager
def _admit_gloo():
    """Let the overlap hooks (ours and torch's alike) be built on Gloo: TEST ONLY, to run the
    overlap logic on this GPU-less machine. Only hook_with_zero_step is used so: the
    interleaved hook chains its step on Gloo futures whose callbacks run concurrently on Gloo's
    worker threads, and torch's own interleaved hook fails there too (the reason both refuse
    Gloo)."""
    real = dist.get_backend
    dist.get_backend = lambda group=None: dist.Backend.NCCL
    try:
        yield
    finally:
        dist.get_backend = real


def _overlap_train(impl, cls, hook_factory, shard, rank, device, iters, admit_gloo=False):
    model = _model(device, wide=True)
    start = [p.detach().clone() for p in model.parameters()]
    # a small bucket cap so DDP makes several buckets (and shard_buckets has work to do)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=0.001)
    zero = impl(ddp.parameters(), cls, overlap_with_ddp=True, lr=0.01)
    if admit_gloo:
        with _admit_gloo():
            hook = hook_factory(default_hooks.allreduce_hook, ddp, zero, shard_buckets=shard)
    else:
        hook = hook_factory(default_hooks.allreduce_hook, ddp, zero, shard_buckets=shard)
    ddp.register_comm_hook(None, hook)
    gen = torch.Generator().manual_seed(70 + rank)
    for _ in range(iters):
        x = torch.randn(4, 5, generator=gen).to(device)
        y = torch.randn(4, 3, generator=gen).to(device)
        nn.functional.mse_loss(ddp(x), y).backward()
        assert zero.step() is None  # the hook steps; step() is a no-op, as in torch's recipe
    params = [p.detach().clone() for p in model.parameters()]
    assert all(compare(a, b) is not None for a, b in zip(params, start)), "no update happened"
    return params, zero, list(model.parameters())


def _assignments(zero, params):
    info = zero._overlap_info
    return dict(
        per_rank=[{b: (a.offset, [_ix(params, p) for p in a.parameters]) for b, a in d.items()}
                  for d in zero._bucket_assignments_per_rank],
        buckets=[[_ix(params, p) for p in b] for b in info.params_per_bucket],
        partition=_index_partition(zero, params),
        offsets=dict(info.offsets),
        assigned=[sorted(s) for s in info.assigned_ranks_per_bucket],
        n=info.num_bucket_assignments,
        status=int(info.status),
    )


def _overlap_parity(rank, device, hooks, admit_gloo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for algo, ours_cls in [("Adam", oo.Adam), ("SGD", oo.SGD), ("AdamW", functional_optim.FunctionalAdamW)]:
            for ours_hook, torch_hook in hooks:
                for shard in (False, True):
                    what = f"overlap {algo} {ours_hook.__name__} shard_buckets={shard}"
                    ours, zo, po = _overlap_train(ZeRO, ours_cls, ours_hook, shard, rank, device, 6, admit_gloo)
                    theirs, zt, pt = _overlap_train(TorchZeRO, getattr(torch.optim, algo), torch_hook, shard,
                                                    rank, device, 6, admit_gloo)
                    _assert_params_equal(ours, theirs, what)
                    _assert_same_across_ranks(ours, dist.group.WORLD)
                    mine = _assignments(zo, po)
                    assert mine == _assignments(zt, pt), what
                    assert len(mine["buckets"]) >= 2, mine
                    # trainability may not change at run time with overlap
                    po[0].requires_grad_(False)
                    pt[0].requires_grad_(False)
                    _same_error(lambda: zo._local_step([]), lambda: zt._local_step([]), RuntimeError)


def _run_overlap_gloo(rank, ws):
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook as torch_hooks
    _overlap_parity(rank, torch.device("cpu"), [(hook_with_zero_step, torch_hooks.hook_with_zero_step)], True)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_overlap_with_ddp_logic_on_gloo(ranks, world_size):
    """With the Gloo refusal lifted for the test only (both implementations), overlapping the
    step with DDP's backward (hook_with_zero_step, whole and sharded buckets, optparity, torch
    and functional optimizer classes) matches torch bit for bit: parameters after the delayed
    initialisation and several steps, bucket assignments, offsets and partition."""
    ranks(world_size).run(_run_overlap_gloo, timeout=120)


def _run_overlap_nccl(rank, ws, backend):
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook as torch_hooks
    hooks = [(hook_with_zero_step, torch_hooks.hook_with_zero_step),
             (hook_with_zero_step_interleaved, torch_hooks.hook_with_zero_step_interleaved)]
    _overlap_parity(rank, _device(rank, backend), hooks, False)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_overlap_with_ddp_nccl(ranks, world_size):
    """overlap_with_ddp with both hooks (whole and sharded buckets) equals torch's on NCCL."""
    ranks(world_size, "nccl").run(_run_overlap_nccl, "nccl")


# ---------------------------------------------------------------------------
# bad input: same exception type and message as torch, nothing modified
# ---------------------------------------------------------------------------

def _run_errors(rank, ws):
    p = _make_params(torch.device("cpu"))
    cases = [
        (lambda impl, cls: impl(torch.zeros(3), cls, lr=0.1), TypeError),
        (lambda impl, cls: impl(5, cls, lr=0.1), TypeError),
        (lambda impl, cls: impl([], cls, lr=0.1), ValueError),
        (lambda impl, cls: impl([p[0], {"params": [p[1]]}], cls, lr=0.1), TypeError),
        (lambda impl, cls: impl([{"params": [p[0]]}, {"lr": 0.1}], cls, lr=0.1), ValueError),
        (lambda impl, cls: impl([p[0], p[1].double()], cls, lr=0.1), ValueError),
        (lambda impl, cls: impl([torch.zeros(3, 3).to_sparse().requires_grad_()], cls, lr=0.1), ValueError),
    ]
    for build, exc in cases:
        _same_error(lambda: build(ZeRO, oo.SGD), lambda: build(TorchZeRO, torch.optim.SGD), exc)

    from torch.distributed.optim.utils import functional_optim_map as torch_fmap
    _same_error(lambda: ZeRO(_clone(p), torch_fmap[torch.optim.Adam], lr=0.1),
                lambda: TorchZeRO(_clone(p), torch_fmap[torch.optim.Adam], lr=0.1), ValueError)
    got = _raised(lambda: ZeRO(_clone(p), functional_optim.FunctionalAdam, lr=0.1))
    assert got is not None and got[0] is ValueError and "functional optimizer" in got[1]

    ours = ZeRO(_groups(_clone(p), "Adam"), oo.Adam, **HYPER["Adam"])
    theirs = TorchZeRO(_groups(_clone(p), "Adam"), torch.optim.Adam, **HYPER["Adam"])
    _same_error(ours.state_dict, theirs.state_dict, RuntimeError)
    # a state dict for another layout is refused before anything changes
    bad_params = _clone(p)
    bad = oo.Adam([{"params": bad_params[:4]}, {"params": bad_params[4:]}], lr=0.1)
    _set_grads(bad_params, _avg_grads(0, [0], torch.device("cpu")))
    bad.step()
    before = copy.deepcopy(ours.optim.state_dict())
    _same_error(lambda: ours.load_state_dict(bad.state_dict()),
                lambda: theirs.load_state_dict(bad.state_dict()), ValueError)
    _assert_same(ours.optim.state_dict(), before, "local state after a refused load")
    assert all(v is not None for v in bad.state_dict()["state"].values())
    # explicit partitions
    _same_error(lambda: ours._partition_parameters([[]] * ws), lambda: theirs._partition_parameters([[]] * ws),
                AssertionError)
    ours._clear_cache()
    theirs._clear_cache()
    _same_error(lambda: ours._partition_parameters([[]] * ws), lambda: theirs._partition_parameters([[]] * ws),
                RuntimeError)
    single_p = _clone(p)
    o1 = ZeRO(single_p, oo.SGD, lr=0.1)
    t1 = TorchZeRO(single_p, torch.optim.SGD, lr=0.1)
    for arg in ([[]] * (ws + 1), [[torch.zeros(2)]] + [[]] * (ws - 1)):
        o1._clear_cache()
        t1._clear_cache()
        _same_error(lambda: o1._partition_parameters(arg), lambda: t1._partition_parameters(arg), ValueError)


@pytest.mark.parametrize("world_size", [1, 2])
def test_bad_input_errors_match_torch(ranks, world_size):
    """Constructor, functional-class, state-dict and explicit-partition errors have torch's
    type and message; a refused load_state_dict leaves the local state untouched."""
    ranks(world_size).run(_run_errors)
