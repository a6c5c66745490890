"""optparity.distributed accepts NAdam, RAdam and ASGD: ZeroRedundancyOptimizer, NamedOptimizer
and apply_optimizer_in_backward over them step exactly like the plain optimizer (and ZeRO like
upstream's ZeRO over torch.optim), in one process at world size 1 (Gloo over an in-process store)."""
import pytest
import torch
import torch.distributed as dist

import optparity.distributed as od
import optparity.optim

ALGOS = {
    "NAdam": {"lr": 0.01, "weight_decay": 0.1, "momentum_decay": 0.006},
    "RAdam": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    "ASGD": {"lr": 0.02, "t0": 2, "weight_decay": 0.05},
}
STEPS = 8  # RAdam's rectified branch starts at step 6


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


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 4, generator=g)


def _train(model, opt, in_backward=False):
    for step in range(STEPS):
        # the module, not the optimizer: upstream's _NamedOptimizer has no working zero_grad
        model.zero_grad()
        model(_batch(step)).square().sum().backward()
        if not in_backward:
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _same_bits(a, b):
    return all(x.dtype == y.dtype and torch.equal(x.view(torch.int32), y.view(torch.int32))
               for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("algo", ALGOS)
def test_zero_over_new_algorithms(world_of_one, algo):
    kwargs = ALGOS[algo]
    ours = getattr(optparity.optim, algo)
    plain = _model()
    plain_opt = ours(plain.parameters(), **kwargs)
    expected = _train(plain, plain_opt)
    plain_state = plain_opt.state_dict()["state"]
    for bucket_view in (False, True):
        m = _model()
        zero = od.ZeroRedundancyOptimizer(m.parameters(), ours, parameters_as_bucket_view=bucket_view,
                                          **kwargs)
        assert _same_bits(_train(m, zero), expected), f"bucket_view={bucket_view}"
        zero.consolidate_state_dict(to=0)
        state = zero.state_dict()["state"]
        # the consolidated state is the unsharded optimizer's, key for key and bit for bit
        assert state.keys() == plain_state.keys()
        for i, entries in plain_state.items():
            assert list(state[i]) == list(entries)
            assert _same_bits([state[i][k] for k in entries], [entries[k] for k in entries])
    upstream_model = _model()
    upstream = torch.distributed.optim.ZeroRedundancyOptimizer(
        upstream_model.parameters(), getattr(torch.optim, algo), **kwargs)
    assert _same_bits(_train(upstream_model, upstream), expected)


@pytest.mark.parametrize("algo", ALGOS)
def test_named_optimizer_over_new_algorithms(algo):
    kwargs = ALGOS[algo]
    ours = getattr(optparity.optim, algo)
    plain = _model()
    expected = _train(plain, ours(plain.parameters(), **kwargs))
    m = _model()
    named = od.NamedOptimizer(m.named_parameters(), ours, **kwargs)
    assert _same_bits(_train(m, named), expected)
    state = named.state_dict()
    assert set(state["state"]) == {name for name, _ in m.named_parameters()}
    # a fresh NamedOptimizer loads it and holds the same state tensors
    fresh = od.NamedOptimizer(m.named_parameters(), ours, **kwargs)
    fresh.init_state()  # upstream too refuses to load into an optimizer without state
    fresh.load_state_dict(state)
    again = fresh.state_dict()["state"]
    for name, entries in state["state"].items():
        assert entries.keys() == again[name].keys()
        assert all(torch.equal(entries[k], again[name][k]) for k in entries)


@pytest.mark.parametrize("algo", ALGOS)
def test_in_backward_over_new_algorithms(algo):
    kwargs = ALGOS[algo]
    ours = getattr(optparity.optim, algo)
    plain = _model()
    expected = _train(plain, ours(plain.parameters(), **kwargs))
    m = _model()
    od.apply_optimizer_in_backward(ours, m.parameters(), kwargs)
    got = _train(m, None, in_backward=True)
    assert _same_bits(got, expected)
    optimizers = od.get_in_backward_optimizers(m)
    assert len(optimizers) == len(list(m.parameters()))
    assert all(type(o) is ours for o in optimizers)
