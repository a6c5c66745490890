"""Every torch.optim algorithm through every distributed wrapper, bit for bit against upstream's.

For each algorithm of optparity.harness.algorithms.ALGORITHMS (a new algorithm is picked up
automatically, fed according to its `kind`), with an option-rich configuration and, where the
algorithm takes them, two parameter groups (the second with the harness's second-group
overrides):

  * ZeroRedundancyOptimizer(optimizer_class=optparity's class) against upstream's
    ZeroRedundancyOptimizer(optimizer_class=torch.optim's class), with and without bucket
    views: at world size 1 in this process and at world sizes 2 and 3 in spawned Gloo ranks
    (optparity.harness.ranks.RankPool, as suites/distributed). Parameters and every rank's
    local optimizer state after every step, the same on all ranks; consolidate_state_dict on
    the last rank; state dicts cross-loaded (ours <- upstream's, upstream's <- ours) into fresh
    optimizers that then keep training bit-identically.
  * overlap_with_ddp: upstream steps it with its functional optimizers, which exist for 8
    algorithms; for those ours (over optparity's Functional*) trains like upstream's inside
    DDP's comm hook; for the others both refuse at construction with the same ValueError.
  * PostLocalSGDOptimizer over the algorithm with a PeriodicModelAverager against upstream's,
    at world size 2, including state_dict / load_state_dict resume.
  * NamedOptimizer against upstream's _NamedOptimizer (state_dict equal after every step,
    init_state, cross-loading) and apply_optimizer_in_backward against upstream's.
  * Where upstream refuses (LBFGS without a closure or with parameter groups, Muon with a
    non-2-D parameter, SparseAdam with dense gradients, overlap_with_ddp without a functional
    optimizer), ours refuses with the same exception type and message, and nothing changed.

Everything is compared with optparity.harness.bitwise.compare (dtype, shape and every bit);
Python floats by their hex form (so -0.0 differs from 0.0). OPTPARITY_TEST_LEVEL=full adds
world size 4, more steps, sharded DDP buckets and post-local SGD at world size 3.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch.distributed.optim warns about its TorchScript use
    from torch.distributed.algorithms.ddp_comm_hooks import ddp_zero_hook as up_zero_hook
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.model_averaging import averagers as up_averagers
    from torch.distributed.optim import PostLocalSGDOptimizer as UpPostLocalSGD
    from torch.distributed.optim import ZeroRedundancyOptimizer as UpZeRO
    from torch.distributed.optim import _apply_optimizer_in_backward as up_apply_in_backward
    from torch.distributed.optim import _get_in_backward_optimizers as up_get_in_backward
    from torch.distributed.optim import _NamedOptimizer as UpNamedOptimizer
    from torch.distributed.optim.utils import as_functional_optim as up_as_functional
    from torch.distributed.optim.utils import functional_optim_map as up_functional_map
from torch.nn.parallel import DistributedDataParallel as DDP

from optparity.distributed import model_averaging
from optparity.distributed.functional_optim import as_functional_optim as our_as_functional
from optparity.distributed.functional_optim import functional_optim_map as our_functional_map
from optparity.distributed.apply_optimizer_in_backward import (
    apply_optimizer_in_backward,
    get_in_backward_optimizers,
)
from optparity.distributed.named_optimizer import NamedOptimizer
from optparity.distributed.post_localSGD_optimizer import PostLocalSGDOptimizer
from optparity.distributed.zero_redundancy_optimizer import ZeroRedundancyOptimizer, hook_with_zero_step
from optparity.harness.algorithms import ALGORITHMS, spec
from optparity.harness.bitwise import compare
from optparity.harness.levels import suite_level, takes_param_groups
from optparity.harness.ranks import RankPool

FULL = suite_level() == "full"
WORLD_SIZES = (2, 3, 4) if FULL else (2, 3)
POST_LOCAL_WORLD_SIZES = (2, 3) if FULL else (2,)
# RAdam's rectified branch starts at step 6; LBFGS keeps history across steps
STEPS_BEFORE, STEPS_AFTER = (8, 5) if FULL else (5, 3)

# Non-default values for (nearly) every option each algorithm has. An algorithm missing here
# (a new one) is run with the richest configuration the harness describes for it.
CONFIGS = {
    "ASGD": dict(lr=0.02, lambd=1e-3, alpha=0.5, t0=2, weight_decay=0.05, maximize=True),
    "Adadelta": dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01, maximize=True),
    "Adafactor": dict(lr=0.02, beta2_decay=-0.7, eps=(1e-20, 1e-2), d=1.2, weight_decay=0.05, maximize=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-8,
                    maximize=True),
    "Adam": dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, amsgrad=True, maximize=True),
    "AdamW": dict(lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05, amsgrad=True),
    "Adamax": dict(lr=0.02, betas=(0.85, 0.9), eps=1e-6, weight_decay=0.01, maximize=True),
    "LBFGS": dict(lr=0.5, max_iter=4, max_eval=6, tolerance_grad=1e-9, tolerance_change=1e-11,
                  history_size=3, line_search_fn="strong_wolfe"),
    "Muon": dict(lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=True, ns_coefficients=(3.4, -4.7, 2.0),
                 eps=1e-6, ns_steps=3, adjust_lr_fn="match_rms_adamw"),
    "NAdam": dict(lr=0.01, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.1, momentum_decay=0.006,
                  decoupled_weight_decay=True, maximize=True),
    "RAdam": dict(lr=0.01, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1, decoupled_weight_decay=True,
                  maximize=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True,
                    maximize=True),
    "Rprop": dict(lr=0.01, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05), maximize=True),
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=True),
    "SparseAdam": dict(lr=0.05, betas=(0.5, 0.6), eps=1e-3, maximize=True),
}


def _config(algo: str) -> dict:
    if algo in CONFIGS:
        return dict(CONFIGS[algo])
    return dict(max(spec(algo).configs(), key=len))


# ---------------------------------------------------------------------------
# what each kind of algorithm is fed (run in this process and inside the ranks)
# ---------------------------------------------------------------------------

class _Embeddings(nn.Module):
    """Two nn.Embedding(sparse=True) tables: uncoalesced sparse gradients with repeated rows,
    each table's gradient depending on the other's values."""

    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(12, 4, sparse=True)
        self.b = nn.Embedding(7, 4, sparse=True)

    def forward(self, ia, ib):
        return (self.a(ia) * self.b(ib)).sum(-1)


def _module(kind: str, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "sparse":
            return _Embeddings()
        if kind == "matrix":  # 2-D parameters only, wide and tall
            return nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 6, bias=False), nn.Tanh(),
                                 nn.Linear(6, 3, bias=False))
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _loss(module: nn.Module, kind: str, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + 97 * step + 7 * rank)  # rank-dependent data
    if kind == "sparse":
        x = (torch.randint(0, 12, (9,), generator=g), torch.randint(0, 7, (9,), generator=g))
        y = torch.randn(9, generator=g)
    else:
        x, y = (torch.randn(6, 5, generator=g),), torch.randn(6, 3, generator=g)
    return ((module(*x) - y) ** 2).mean()


def _step(opt, module: nn.Module, kind: str, step: int, rank: int):
    """One training step: closure-only algorithms get step(closure); the others a backward
    then step(). Returns what the step returned and, for a closure, how often it ran."""
    if kind == "closure":
        calls = []

        def closure():
            calls.append(1)
            module.zero_grad()
            loss = _loss(module, kind, step, rank)
            loss.backward()
            return loss

        return opt.step(closure), len(calls)
    # the module, not the optimizer: upstream's _NamedOptimizer has no working zero_grad
    module.zero_grad()
    _loss(module, kind, step, rank).backward()
    return opt.step(), None


def _groups(algo: str, module: nn.Module):
    """Two groups (the second with the harness's overrides) where the algorithm takes groups."""
    params = list(module.parameters())
    if not takes_param_groups(algo):
        return params
    cut = (len(params) + 1) // 2
    return [{"params": params[:cut]}, {"params": params[cut:], **spec(algo).second_group}]


def _copy_params(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters(), strict=True):
            p.copy_(q)


def _snapshot(module: nn.Module):
    return [(p.detach().clone(), p.data_ptr()) for p in module.parameters()]


# ---------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------

def _same(a, b, path: str) -> None:
    """Deep equality of nested states: tensors bit for bit, dict key order included, floats
    by their bits."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        diff = compare(a.detach(), b.detach())
        assert diff is None, f"{path}: {diff.describe()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert type(b) is float and a.hex() == b.hex(), f"{path}: {a!r} vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def _same_params(ours: nn.Module, theirs: nn.Module, what: str) -> None:
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        _same(p, q, f"{what}: {name}")


def _unchanged(module: nn.Module, before, what: str) -> None:
    for (name, p), (value, ptr) in zip(module.named_parameters(), before, strict=True):
        _same(p, value, f"{what}: {name} changed")
        assert p.data_ptr() == ptr, f"{what}: {name} was moved"


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type and message are what is compared
        return type(e), str(e)
    return None


def _same_refusal(ours, theirs, what: str):
    """Upstream refuses, and ours refuses with the same type and message."""
    want = _outcome(theirs)
    assert want is not None, f"{what}: upstream accepted it (this test expects a refusal)"
    got = _outcome(ours)
    assert got == want, f"{what}: ours {got}, upstream {want}"
    return want


def _same_across_ranks(module: nn.Module, group) -> bool:
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, flat, group=group)
    return all(compare(other, flat) is None for other in everyone)


def _bcast(obj, src: int, group):
    """`obj` of group rank `src`, on every rank of `group`."""
    holder = [obj]
    dist.broadcast_object_list(holder, src=dist.get_global_rank(group, src), group=group)
    return holder[0]


_GROUPS: dict = {}  # in a rank: world size -> its process group


def _group(world_size: int):
    """In a rank of the pool: the process group of the pool's last `world_size` ranks (WORLD
    when that is all of them; else group ranks differ from global ranks, which ZeRO's
    broadcasts and consolidation must translate), or None where this rank is not in it.
    Collective on the first call for a size: every rank of the pool calls it."""
    total = dist.get_world_size()
    if world_size == total:
        return dist.group.WORLD
    members = list(range(total - world_size, total))
    if world_size not in _GROUPS:
        _GROUPS[world_size] = dist.new_group(members)
    return _GROUPS[world_size] if dist.get_rank() in members else None


def _sorted_state(sd: dict, groups: bool = False) -> dict:
    """`sd` with its state (and with `groups` each param group's keys) in sorted order."""
    out = {**sd, "state": dict(sorted(sd["state"].items()))}
    if groups:
        out["param_groups"] = [dict(sorted(g.items())) for g in sd["param_groups"]]
    return out


def _canonical(sd: dict, order=None) -> dict:
    """`sd` with parameter indices renamed by `order` (local -> global), and its state, each
    group's keys and each group's parameter list sorted."""
    rename = (lambda i: i) if order is None else order.__getitem__
    return {"state": dict(sorted((rename(i), v) for i, v in sd["state"].items())),
            "param_groups": [dict(sorted({**g, "params": sorted(map(rename, g["params"]))}.items()))
                             for g in sd["param_groups"]]}


def _classes(algo: str):
    s = spec(algo)
    return s.optparity_class(), s.torch_class()


# ---------------------------------------------------------------------------
# ZeroRedundancyOptimizer (runs in every rank; world size 1 in this process)
# ---------------------------------------------------------------------------

def _zero_parity(rank: int, world_size: int, algo: str, bucket_view: bool, n_before: int, n_after: int,
                 config: dict | None = None, group=None) -> int:
    """Ours and upstream's ZeRO side by side on `group` (default WORLD; `rank` is the group
    rank), plus at world size 1 the plain unsharded optimizer; the number of (run, step)
    pairs compared."""
    group = dist.group.WORLD if group is None else group
    kind = spec(algo).kind
    hp = _config(algo) if config is None else config
    ours_cls, torch_cls = _classes(algo)

    def build(impl, cls, source=None):
        module = _module(kind)
        if source is not None:
            _copy_params(module, source)  # before the buckets copy them
        # a configuration of its own each (a tensor lr must not be shared)
        return module, impl(_groups(algo, module), cls, process_group=group, parameters_as_bucket_view=bucket_view,
                            **copy.deepcopy(hp))

    mo, zo = build(ZeroRedundancyOptimizer, ours_cls)
    mt, zt = build(UpZeRO, torch_cls)
    index = {p: i for i, p in enumerate(mo.parameters())}
    plain = None
    if world_size == 1:
        # One rank owns everything: the unsharded optimizer's run exactly, given the
        # parameters in the order ZeRO hands them to its local optimizer (largest first; LBFGS
        # flattens them in that order).
        mp = _module(kind)
        params = list(mp.parameters())
        order = [index[p] for g in zo._partition_parameters()[0] for p in g["params"]]
        local = [{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
                  "params": [params[index[p]] for p in g["params"]]} for g in zo._partition_parameters()[0]]
        plain = (mp, ours_cls(local if takes_param_groups(algo) else local[0]["params"], **copy.deepcopy(hp)))
    index_t = {p: i for i, p in enumerate(mt.parameters())}
    assert {index[p]: r for p, r in zo._param_to_rank.items()} == \
           {index_t[p]: r for p, r in zt._param_to_rank.items()}, "partition differs"
    runs = {"ours": (mo, zo)}
    where = f"{algo} bucket_view={bucket_view} world_size={world_size} rank {rank}"
    compared = 0

    def step_all(t):
        nonlocal compared
        want = _step(zt, mt, kind, t, rank)
        if plain is not None:
            _same(_step(plain[1], plain[0], kind, t, rank), want, f"{where} step {t}: plain optimizer returned")
            _same_params(plain[0], mt, f"{where} step {t}: plain optimizer")
        for name, (m, z) in runs.items():
            what = f"{where} step {t}: {name}"
            _same(_step(z, m, kind, t, rank), want, f"{what}: returned (loss, closure calls)")
            _same_params(m, mt, what)
            _same_local_state(z, zt, name, what)
            _same([{k: v for k, v in g.items() if k != "params"} for g in z.param_groups],
                  [{k: v for k, v in g.items() if k != "params"} for g in zt.param_groups], f"{what}: param_groups")
            assert _same_across_ranks(m, group), f"{what}: parameters differ between ranks"
            compared += 1

    def _same_local_state(z, reference, name, what):
        # A loaded local optimizer holds its state in the state dict's (global index) order, a
        # trained one in the order its parameters first stepped: the two loaded ones must
        # agree in order too, and everyone with upstream's trained one entry for entry.
        if name.startswith("ours <-"):
            _same(z.optim.state_dict(), runs["upstream <- ours state dict"][1].optim.state_dict(),
                  f"{what}: local optimizer state, against upstream's loaded one")
        _same(_sorted_state(z.optim.state_dict()), _sorted_state(reference.optim.state_dict()),
              f"{what}: local optimizer state")
        if name == "ours":
            _same(z.optim.state_dict(), reference.optim.state_dict(), f"{what}: local optimizer state")

    for t in range(n_before):
        step_all(t)

    to = world_size - 1  # consolidate on the last rank
    zo.consolidate_state_dict(to=to)
    zt.consolidate_state_dict(to=to)
    if rank == to:
        sd_ours, sd_theirs = zo.state_dict(), zt.state_dict()
        _same(sd_ours, sd_theirs, f"{where}: consolidated state dict")
        if plain is not None:
            # the unsharded optimizer's, in global indices (ZeRO's groups list its keyword
            # arguments first, upstream's too, then the defaults: compared key by key)
            _same(_canonical(sd_ours), _canonical(plain[1].state_dict(), order), f"{where}: consolidated vs plain")
    else:
        sd_ours = sd_theirs = None
        _same_refusal(zo.state_dict, zt.state_dict, f"{where}: state_dict off the consolidation rank")
    sd_ours, sd_theirs = _bcast(sd_ours, to, group), _bcast(sd_theirs, to, group)

    # fresh optimizers over the current parameters load the other implementation's state dict
    runs["upstream <- ours state dict"] = build(UpZeRO, torch_cls, mt)
    runs["upstream <- ours state dict"][1].load_state_dict(copy.deepcopy(sd_ours))
    runs["ours <- upstream's state dict"] = build(ZeroRedundancyOptimizer, ours_cls, mt)
    runs["ours <- upstream's state dict"][1].load_state_dict(copy.deepcopy(sd_theirs))
    for name, (m, z) in runs.items():
        _same_local_state(z, zt, name, f"{where}: {name}: after loading")
    for t in range(n_before, n_before + n_after):
        step_all(t)
    return compared


@pytest.fixture(scope="module")
def world_of_one():
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            pytest.skip("a process group of another size is already initialised in this process")
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def pool():
    """pool(fn, world_size, *args) -> fn's results on the `world_size` ranks that ran it: one
    RankPool of Gloo ranks (the largest world size; spawning is the expensive part on two
    cores), the smaller world sizes on a process group of its last ranks."""
    held: list[RankPool] = []

    def run(fn, world_size: int, *args):
        if not held or not held[0].alive:
            held[:] = [RankPool(max(WORLD_SIZES), "gloo", timeout=120)]
        results = held[0].run(fn, world_size, *args, timeout=120)
        assert results[:-world_size] == [None] * (len(results) - world_size), "a rank outside the group ran"
        return results[-world_size:]

    yield run
    for p in held:
        p.close()


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_zero_world_of_one(world_of_one, algo):
    """World size 1, in this process: ours over optparity's class = upstream's over torch's."""
    n = sum(_zero_parity(0, 1, algo, bv, STEPS_BEFORE, STEPS_AFTER) for bv in (False, True))
    assert n == 2 * (STEPS_BEFORE + 3 * STEPS_AFTER)


def _accepted(algo: str, config: dict) -> bool:
    """Whether torch.optim's class trains with `config` (the harness also lists configurations
    it refuses; refusing them is the bad-input tests' business, not the wrappers')."""
    kind = spec(algo).kind
    module = _module(kind)
    try:
        opt = spec(algo).torch_class()(_groups(algo, module), **copy.deepcopy(config))
        for t in range(2):
            _step(opt, module, kind, t, 0)
    except Exception:  # noqa: BLE001 - any refusal
        return False
    return True


@pytest.mark.skipif(not FULL, reason="the full level only (OPTPARITY_TEST_LEVEL=full): every configuration")
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_zero_world_of_one_every_configuration(world_of_one, algo):
    """Every configuration the harness lists for the algorithm (torch's own and ours, tensor
    learning rates included) that torch.optim trains with, through ZeRO at world size 1."""
    configs = [c for c in spec(algo).configs() if _accepted(algo, c)]
    assert configs
    for config in configs:
        for bv in (False, True):
            _zero_parity(0, 1, algo, bv, 3, 2, config)


def _zero_ranks(rank, pool_size, world_size, algo, n_before, n_after):
    group = _group(world_size)
    if group is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [_zero_parity(dist.get_rank(group), world_size, algo, bv, n_before, n_after, group=group)
                for bv in (False, True)]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_zero_across_processes(pool, world_size, algo):
    """World sizes 2 and 3 (4 at the full level) over Gloo, every rank checking its shard."""
    done = pool(_zero_ranks, world_size, algo, STEPS_BEFORE, STEPS_AFTER)
    assert done == [[STEPS_BEFORE + 3 * STEPS_AFTER] * 2] * world_size


# ---------------------------------------------------------------------------
# overlap_with_ddp
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ALGORITHMS)
def test_overlap_with_ddp_needs_an_upstream_functional_optimizer(world_of_one, algo):
    """The harness's `functional_upstream` says whether upstream has a functional optimizer;
    without one both refuse overlap_with_ddp at construction, the same way, whether given
    torch.optim's class or (for ours) optparity's."""
    ours_cls, torch_cls = _classes(algo)
    assert spec(algo).functional_upstream == (torch_cls in up_functional_map)
    if spec(algo).functional_upstream:
        # ours maps both classes to optparity's functional optimizer (trained in
        # test_overlap_with_ddp_trains_like_upstream)
        for cls in (ours_cls, torch_cls):
            assert type(our_as_functional(cls)).__module__ == "optparity.distributed.functional_optim"
        return
    kind, message = _same_refusal(lambda: our_as_functional(torch_cls), lambda: up_as_functional(torch_cls),
                                  f"{algo} as_functional_optim")
    assert _outcome(lambda: our_as_functional(ours_cls)) == (kind, message.replace(str(torch_cls), str(ours_cls)))
    module = _module(spec(algo).kind)
    before = _snapshot(module)
    kwargs = dict(overlap_with_ddp=True, **_config(algo))
    want = _same_refusal(lambda: ZeroRedundancyOptimizer(module.parameters(), torch_cls, **kwargs),
                         lambda: UpZeRO(module.parameters(), torch_cls, **kwargs), f"{algo} overlap_with_ddp")
    assert want[0] is ValueError
    got = _outcome(lambda: ZeroRedundancyOptimizer(module.parameters(), ours_cls, **kwargs))
    assert got == (ValueError, want[1].replace(str(torch_cls), str(ours_cls)))
    _unchanged(module, before, f"{algo} overlap_with_ddp refused")


@contextlib.contextmanager
def _admit_gloo():
    """Both implementations' overlap hooks refuse Gloo; let them be built on it (test only,
    as suites/distributed/test_zero.py does) to run the overlap logic without a GPU."""
    real = dist.get_backend
    dist.get_backend = lambda group=None: dist.Backend.NCCL
    try:
        yield
    finally:
        dist.get_backend = real


def _overlap_train(impl, cls, hook_factory, algo, shard, rank, iters, group):
    module = _module("dense")
    ddp = DDP(module, process_group=group, bucket_cap_mb=0.00005)  # a few buckets
    zero = impl(ddp.parameters(), cls, process_group=group, overlap_with_ddp=True, **_config(algo))
    with _admit_gloo():
        hook = hook_factory(default_hooks.allreduce_hook, ddp, zero, shard_buckets=shard)
    ddp.register_comm_hook(None, hook)
    history = []
    for t in range(iters):
        _loss(ddp, "dense", t, rank).backward()
        assert zero.step() is None  # the hook steps
        history.append([p.detach().clone() for p in module.parameters()])
    return history, zero


def _overlap_ranks(rank, pool_size, world_size, algo, iters, shards):
    group = _group(world_size)
    if group is None:
        return None
    rank = dist.get_rank(group)
    ours_cls, torch_cls = _classes(algo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shard in shards:
            what = f"{algo} overlap_with_ddp shard_buckets={shard} rank {rank}"
            ours, zo = _overlap_train(ZeroRedundancyOptimizer, ours_cls, hook_with_zero_step, algo, shard, rank, iters,
                                      group)
            theirs, zt = _overlap_train(UpZeRO, torch_cls, up_zero_hook.hook_with_zero_step, algo, shard, rank,
                                        iters, group)
            _same(ours, theirs, f"{what}: parameters after each iteration")
            assert compare(ours[0][0], ours[-1][0]) is not None, f"{what}: nothing was updated"
            own, up = zo.optim.param_group["params"], zt.optim.param_group["params"]
            # (a rank may own no DDP bucket: then nothing to step, as upstream's)
            assert len(own) == len(up) and len(zo.optim.state) == len(zt.optim.state), what
            for i, (p, q) in enumerate(zip(own, up)):
                _same(p, q, f"{what}: local parameter {i}")
                _same(zo.optim.state.get(p), zt.optim.state.get(q), f"{what}: state of local parameter {i}")
    return len(shards)


def _shard_buckets(algo: str) -> tuple:
    """Whole DDP buckets always; sharded ones (a rank then steps part of its shard per bucket,
    the rest of its gradients None) at the full level, except for Adagrad: upstream's
    _FunctionalAdagrad hands its kernel every parameter but only the given gradients and
    fails there (ours the same way, see test_functional_step_with_missing_gradients), and a
    rank failing inside DDP's comm hook leaves its peer waiting in a collective."""
    return (False, True) if FULL and algo != "Adagrad" else (False,)


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if spec(a).functional_upstream])
def test_overlap_with_ddp_trains_like_upstream(pool, algo):
    """DDP with hook_with_zero_step at world size 3 (4 at the full level): ours (optparity's class -> our Functional*)
    equals upstream's (torch.optim's class -> torch's _Functional*) after every iteration,
    local functional state included."""
    shards = _shard_buckets(algo)
    # on the pool's WORLD: on a subgroup the Gloo-admitted hook deadlocks in DDP's all-reduce
    # (the hang Gloo is refused for); that needs NCCL to check
    world_size = max(WORLD_SIZES)
    assert pool(_overlap_ranks, world_size, algo, 6, shards) == [len(shards)] * world_size


def _functional_partial(cls, algo, grads_given, steps=3):
    """A functional optimizer stepped with gradients for `grads_given` only: per step, the
    exception (or None), the parameters and the state."""
    hp = _config(algo)
    module = _module("dense")
    params = [p.detach().clone() for p in module.parameters()]
    opt = cls(params, **hp)
    history = []
    for t in range(steps):
        g = torch.Generator().manual_seed(300 + t)
        grads = [torch.randn(p.shape, generator=g) if i in grads_given else None for i, p in enumerate(params)]
        outcome = _outcome(lambda: opt.step(grads))
        history.append((outcome, [p.clone() for p in params],
                        [copy.deepcopy(opt.state.get(p)) for p in params]))
        if outcome is not None:
            break
    return history


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if spec(a).functional_upstream])
def test_functional_step_with_missing_gradients(algo):
    """What overlap_with_ddp hands a local functional optimizer: a gradient for some of its
    parameters, None for the rest. Ours = upstream's, parameters and state after each step, or
    the same exception (Adagrad's kernel gets every parameter but only the given gradients)."""
    ours_cls, torch_cls = _classes(algo)
    for given in ({0, 1, 2, 3}, {1, 3}, {0}, {2, 3}, set()):
        # (record: upstream's TorchScript deprecation warning is issued under "always")
        with warnings.catch_warnings(record=True):
            theirs = _functional_partial(up_functional_map[torch_cls], algo, given)
        _same(_functional_partial(our_functional_map[ours_cls], algo, given), theirs, f"{algo} gradients for {given}")


# ---------------------------------------------------------------------------
# PostLocalSGDOptimizer
# ---------------------------------------------------------------------------

def _post_local_ranks(rank, pool_size, world_size, algo, n_before, n_after):
    group = _group(world_size)
    if group is None:
        return None
    rank = dist.get_rank(group)
    kind, hp = spec(algo).kind, _config(algo)
    ours_cls, torch_cls = _classes(algo)

    def build(source=None):
        mo, mt = _module(kind), _module(kind)
        if source is not None:
            _copy_params(mo, source)
            _copy_params(mt, source)
        ours = PostLocalSGDOptimizer(ours_cls(_groups(algo, mo), **hp),
                                     model_averaging.PeriodicModelAverager(period=2, warmup_steps=2,
                                                                           process_group=group))
        theirs = UpPostLocalSGD(torch_cls(_groups(algo, mt), **hp),
                                up_averagers.PeriodicModelAverager(period=2, warmup_steps=2, process_group=group))
        return (mo, ours), (mt, theirs)

    (mo, ours), (mt, theirs) = build()
    where = f"{algo} post-local SGD rank {rank}"
    if kind == "closure":
        # step() takes no closure: LBFGS cannot run under it, upstream's or ours
        before = _snapshot(mo)
        _same_refusal(lambda: _step(ours, mo, kind, 0, rank), lambda: _step(theirs, mt, kind, 0, rank),
                      f"{where}: step(closure)")
        _same_refusal(ours.step, theirs.step, f"{where}: step()")
        _unchanged(mo, before, where)
        assert ours.averager.step == theirs.averager.step == 0 and not ours.optim.state
        return "refused"

    averaged = []
    runs = {"ours": (mo, ours)}

    def step_all(t):
        want = _step(theirs, mt, kind, t, rank)
        for name, (m, o) in runs.items():
            what = f"{where} step {t}: {name}"
            _same(_step(o, m, kind, t, rank), want, f"{what}: returned")
            _same_params(m, mt, what)
            _same(o.state_dict(), theirs.state_dict(), f"{what}: state dict")
        averaged.append(_same_across_ranks(mo, group))

    for t in range(n_before):
        step_all(t)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    (m1, o1), (m2, t2) = build(source=mt)
    o1.load_state_dict(copy.deepcopy(sd_theirs))
    t2.load_state_dict(copy.deepcopy(sd_ours))
    runs["ours <- upstream's state dict"] = (m1, o1)
    runs["upstream <- ours state dict"] = (m2, t2)
    for t in range(n_before, n_before + n_after):
        step_all(t)
    return averaged


@pytest.mark.parametrize("world_size", POST_LOCAL_WORLD_SIZES)
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_post_local_sgd(pool, world_size, algo):
    """Local steps with the algorithm, averaged every 2 steps after 2 warm-up steps: ours (over
    optparity's class and averager) = upstream's (over torch.optim's), parameters and state dict
    (averager counter included) after every step, also after a cross-loaded resume."""
    results = pool(_post_local_ranks, world_size, algo, STEPS_BEFORE, STEPS_AFTER)
    if spec(algo).kind == "closure":
        assert results == ["refused"] * world_size
        return
    # the parameters agree across ranks exactly after the averaging steps: warm-up 2, period 2
    # (steps 2, 4, 6, ... counting from 0), the averager's counter carried over by the resume
    expected = [t >= 2 and t % 2 == 0 for t in range(STEPS_BEFORE + STEPS_AFTER)]
    assert results == [expected] * world_size


# ---------------------------------------------------------------------------
# NamedOptimizer (single process)
# ---------------------------------------------------------------------------

def _named_pair(algo, with_groups, source=None):
    kind, hp = spec(algo).kind, _config(algo)
    ours_cls, torch_cls = _classes(algo)
    mo, mt = _module(kind), _module(kind)
    if source is not None:
        _copy_params(mo, source)
        _copy_params(mt, source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both warn that param_groups decide the parameters
        ours = NamedOptimizer(mo.named_parameters(), ours_cls, _groups(algo, mo) if with_groups else None, **hp)
        theirs = UpNamedOptimizer(mt.named_parameters(), torch_cls, _groups(algo, mt) if with_groups else None,
                                  **hp)
    return (mo, ours), (mt, theirs)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_named_optimizer(algo):
    """Training, state_dict (after every step), init_state and cross-loading equal upstream's
    _NamedOptimizer; with the algorithm's two parameter groups where it takes groups."""
    kind = spec(algo).kind
    for with_groups in (False, True) if takes_param_groups(algo) else (False,):
        where = f"{algo} NamedOptimizer groups={with_groups}"
        (mo, ours), (mt, theirs) = _named_pair(algo, with_groups)
        runs = {"ours": (mo, ours)}

        def step_all(t):
            want = _step(theirs, mt, kind, t, 0)
            for name, (m, o) in runs.items():
                what = f"{where} step {t}: {name}"
                _same(_step(o, m, kind, t, 0), want, f"{what}: returned")
                _same_params(m, mt, what)
                _same(o.state_dict(), theirs.state_dict(), f"{what}: state_dict")
                _same(o._optimizer.state_dict(), theirs._optimizer.state_dict(), f"{what}: wrapped state")

        for t in range(STEPS_BEFORE):
            step_all(t)
        sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
        assert sd_ours["state"] and set(sd_ours["state"]) <= {n for n, _ in mo.named_parameters()}
        # fresh ones: state made by init_state where upstream can, else by one step; both the same
        (m1, o1), (m2, t2) = _named_pair(algo, with_groups)
        init = _outcome(t2.init_state)
        _same(_outcome(o1.init_state), init, f"{where}: init_state")
        if init is not None:
            _step(o1, m1, kind, 99, 0)
            _step(t2, m2, kind, 99, 0)
        _same(o1.state_dict(), t2.state_dict(), f"{where}: state after init")
        _copy_params(m1, mt)
        _copy_params(m2, mt)
        o1.load_state_dict(copy.deepcopy(sd_theirs))
        t2.load_state_dict(copy.deepcopy(sd_ours))
        _same(o1.state_dict(), sd_theirs, f"{where}: ours after loading upstream's")
        _same(t2.state_dict(), sd_ours, f"{where}: upstream's after loading ours")
        runs["ours <- upstream's state dict"] = (m1, o1)
        runs["upstream <- ours state dict"] = (m2, t2)
        for t in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
            step_all(t)


# ---------------------------------------------------------------------------
# apply_optimizer_in_backward (single process)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ALGORITHMS)
def test_in_backward(algo):
    """One optimizer per parameter stepped in backward, ours = upstream's: parameters and
    every optimizer's state after every backward; LBFGS (no closure there) refused alike."""
    kind, hp = spec(algo).kind, _config(algo)
    ours_cls, torch_cls = _classes(algo)
    mo, mt = _module(kind), _module(kind)
    apply_optimizer_in_backward(ours_cls, mo.parameters(), hp)
    up_apply_in_backward(torch_cls, mt.parameters(), hp)
    ours_opts, theirs_opts = get_in_backward_optimizers(mo), up_get_in_backward(mt)
    assert len(ours_opts) == len(theirs_opts) == len(list(mo.parameters()))
    assert all(type(o) is ours_cls for o in ours_opts)
    if kind == "closure":
        before = _snapshot(mo)
        _same_refusal(lambda: _loss(mo, kind, 0, 0).backward(), lambda: _loss(mt, kind, 0, 0).backward(),
                      f"{algo} in backward")
        _unchanged(mo, before, f"{algo} in backward")
        assert all(not o.state for o in ours_opts)
        return
    for t in range(STEPS_BEFORE + STEPS_AFTER):
        _loss(mo, kind, t, 0).backward()
        _loss(mt, kind, t, 0).backward()
        what = f"{algo} in backward step {t}"
        assert all(p.grad is None for p in mo.parameters()), f"{what}: gradient kept"
        _same_params(mo, mt, what)
        for i, (o, u) in enumerate(zip(ours_opts, theirs_opts)):
            _same(o.state_dict(), u.state_dict(), f"{what}: optimizer {i}")


# ---------------------------------------------------------------------------
# refusals by kind: the same exception, nothing changed
# ---------------------------------------------------------------------------

def _misfed(kind: str) -> str:
    return {"closure": "LBFGS-like", "matrix": "2-D only", "sparse": "sparse only"}.get(kind, "")


def _two_groups(module: nn.Module) -> list:
    params = list(module.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "lr": 0.1}]


def _refusal_cases(algo: str) -> list:
    """(what, ours, upstream) for each thing upstream refuses for an algorithm of this kind.
    ours / upstream take a fresh dense module (1-D biases, dense gradients) and return
    (the call to refuse, the optimizer it acts on or None)."""
    kind, hp = spec(algo).kind, _config(algo)
    O, T = _classes(algo)

    def zero(impl, cls, m, bv=False, groups=False):
        return impl(_two_groups(m) if groups else m.parameters(), cls, parameters_as_bucket_view=bv, **hp)

    def named(impl, cls, m, groups=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # param_groups given: both warn
            return impl(m.named_parameters(), cls, _two_groups(m) if groups else None, **hp)

    def post_local(impl, cls, m):
        averager = {PostLocalSGDOptimizer: model_averaging.PeriodicModelAverager,
                    UpPostLocalSGD: up_averagers.PeriodicModelAverager}[impl]
        return impl(cls(m.parameters(), **hp), averager(period=2, warmup_steps=0))

    def built(make):
        return lambda m: (lambda: make(m), None)

    def calling(make, method):
        def setup(m):
            opt = make(m)
            return getattr(opt, method), opt
        return setup

    def dense_step(make):
        def setup(m):
            opt = make(m)
            return (lambda: _step(opt, m, "dense", 0, 0)), opt
        return setup

    def in_backward(apply, cls):
        def setup(m):
            apply(cls, m.parameters(), hp)
            return (lambda: _loss(m, "dense", 0, 0).backward()), None
        return setup

    Z, UZ, N, UN, P, UP = (ZeroRedundancyOptimizer, UpZeRO, NamedOptimizer, UpNamedOptimizer,
                           PostLocalSGDOptimizer, UpPostLocalSGD)
    cases = []
    if kind == "closure":
        for bv in (False, True):
            cases.append((f"ZeRO bucket_view={bv}: step() without a closure",
                          calling(lambda m, bv=bv: zero(Z, O, m, bv), "step"),
                          calling(lambda m, bv=bv: zero(UZ, T, m, bv), "step")))
        cases += [
            ("ZeRO over two parameter groups", built(lambda m: zero(Z, O, m, groups=True)),
             built(lambda m: zero(UZ, T, m, groups=True))),
            ("NamedOptimizer: step() without a closure", calling(lambda m: named(N, O, m), "step"),
             calling(lambda m: named(UN, T, m), "step")),
            ("NamedOptimizer: init_state", calling(lambda m: named(N, O, m), "init_state"),
             calling(lambda m: named(UN, T, m), "init_state")),
            ("NamedOptimizer over two parameter groups", built(lambda m: named(N, O, m, groups=True)),
             built(lambda m: named(UN, T, m, groups=True))),
            ("PostLocalSGDOptimizer: step()", calling(lambda m: post_local(P, O, m), "step"),
             calling(lambda m: post_local(UP, T, m), "step")),
            ("in backward: step() without a closure", in_backward(apply_optimizer_in_backward, O),
             in_backward(up_apply_in_backward, T)),
        ]
    elif kind == "matrix":
        cases += [
            ("ZeRO over 1-D parameters", built(lambda m: zero(Z, O, m)), built(lambda m: zero(UZ, T, m))),
            ("NamedOptimizer over 1-D parameters", built(lambda m: named(N, O, m)), built(lambda m: named(UN, T, m))),
            ("in backward over 1-D parameters", built(lambda m: apply_optimizer_in_backward(O, m.parameters(), hp)),
             built(lambda m: up_apply_in_backward(T, m.parameters(), hp))),
        ]
    elif kind == "sparse":
        for bv in (False, True):
            cases.append((f"ZeRO bucket_view={bv}: dense gradients", dense_step(lambda m, bv=bv: zero(Z, O, m, bv)),
                          dense_step(lambda m, bv=bv: zero(UZ, T, m, bv))))
        cases += [
            ("NamedOptimizer: dense gradients", dense_step(lambda m: named(N, O, m)),
             dense_step(lambda m: named(UN, T, m))),
            ("NamedOptimizer: init_state (dense zero gradients)", calling(lambda m: named(N, O, m), "init_state"),
             calling(lambda m: named(UN, T, m), "init_state")),
            ("PostLocalSGDOptimizer: dense gradients", dense_step(lambda m: post_local(P, O, m)),
             dense_step(lambda m: post_local(UP, T, m))),
            ("in backward: dense gradients", in_backward(apply_optimizer_in_backward, O),
             in_backward(up_apply_in_backward, T)),
        ]
    return cases


def _states(opt) -> list:
    """The wrapped optimizer's state dict (and a model averager's counter)."""
    if opt is None:
        return []
    inner = getattr(opt, "optim", None) or getattr(opt, "_optimizer", None)
    return [inner.state_dict(), getattr(getattr(opt, "averager", None), "step", None)]


def _attached(module: nn.Module) -> list:
    return [len(getattr(p, "_in_backward_optimizers", [])) for p in module.parameters()]


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if _refusal_cases(a)])
def test_refusals_match_upstream(world_of_one, algo):
    """closure-only: step() without a closure and two parameter groups; 2-D only: a 1-D
    parameter; sparse only: dense gradients; through ZeRO (both bucket layouts),
    NamedOptimizer, PostLocalSGDOptimizer and in-backward. Same type and message as upstream;
    the parameters untouched (values and storage), no optimizer state made, nothing attached."""
    for what, ours_setup, theirs_setup in _refusal_cases(algo):
        what = f"{algo}: {what}"
        mo, mt = _module("dense"), _module("dense")
        ours, opt = ours_setup(mo)
        theirs, opt_t = theirs_setup(mt)
        before, attached = _snapshot(mo), _attached(mo)
        _same_refusal(ours, theirs, what)
        _unchanged(mo, before, what)
        # Nothing attached by a refused apply_optimizer_in_backward (upstream keeps the
        # optimizers of the parameters before the refused one: ours builds them all first),
        # and no in-backward optimizer made state.
        assert _attached(mo) == attached, f"{what}: in-backward optimizers attached"
        assert not any(o.state for o in get_in_backward_optimizers(mo)), f"{what}: in-backward state made"
        # whatever state the refused call left is upstream's (LBFGS itself counts its
        # evaluations before it calls the closure it was not given)
        _same(_states(opt), _states(opt_t), f"{what}: optimizer state left")
