"""Optimizer state for sharded training (optparity.distributed.optim_state), across processes.

* Re-sharding: a checkpoint saved by N ranks (each writing only its own shard with torch.save)
  is loaded by M ranks with torch.load(weights_only=True), trained on, saved again and loaded
  back by N ranks; after every leg the full state and the parameters equal the uninterrupted
  run bit for bit. The leg to M also changes flavour (ZeRO -> FSDP -> FSDP use_orig_params ->
  fully_shard -> ZeRO), so every conversion between them is exercised in both directions.
* Upstream: our FSDP (full, ShardedTensor sharded, rank0_only loads) and distributed-checkpoint
  entry points against torch's, bit for bit and key order for key order, over Gloo and NCCL; where torch is wrong (FSDP use_orig_params full state) the
  difference is pinned and ours is checked against a single-process optimizer instead.
* Bad input: clear errors naming the parameter, raised before anything changes.

OPTPARITY_OPTIM_STATE_FULL=1 runs every algorithm and every flavour conversion on every (N, M)
pair; the default run covers every pair with Adam and one conversion (rotating over the four),
and all four algorithms with all four conversions on 2 -> 3 and 4 -> 2.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import optim_state_ranks as R
from optparity.distributed import optim_state as ost
from optparity.harness.bitwise import compare

WORLD_SIZES = (1, 2, 3, 4)
FULL = os.environ.get("OPTPARITY_OPTIM_STATE_FULL") == "1"
ALL_ALGOS = tuple(R.HYPER)
ALGO_PAIRS = {(2, 3), (4, 2)}
BACKENDS = ["gloo", "nccl"]  # nccl skips with the reason where there is no GPU (conftest)


def _algos(n, m):
    return ALL_ALGOS if FULL or (n, m) in ALGO_PAIRS else ("Adam",)


def assert_same(a, b, path="dict"):
    """Deep equality: same keys in the same order, same types, tensors bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        diff = compare(a, b)
        assert diff is None, f"{path}: {diff.describe()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


# ---------------------------------------------------------------------------
# N -> M -> N through files
# ---------------------------------------------------------------------------

K1, K2, K3 = 3, 2, 2


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_reshard_round_trips(ranks, tmp_path, n):
    flavours = R.FLAVOURS
    algos = sorted({a for m in WORLD_SIZES for a in _algos(n, m)})
    ref_jobs = [(f, a, None, str(tmp_path / f"A-{f}-{a}"), 0, [K1, K2, K3]) for f in flavours for a in algos]
    ref = dict(zip([(f, a) for f, a, *_ in ref_jobs], ranks(n).run(R.session, ref_jobs, timeout=600)[0]))
    for a in algos:  # the math does not depend on the flavour
        for f in flavours[1:]:
            assert_same(ref[(f, a)], ref[(flavours[0], a)], f"N={n} {a}: {f} vs {flavours[0]}")
    back_jobs = []
    for m in WORLD_SIZES:
        jobs = []
        for i, f in enumerate(flavours):
            if not FULL and i != (n + m) % 4 and (n, m) not in ALGO_PAIRS:
                continue  # default run: one conversion per pair, each conversion on several pairs
            g = flavours[(i + 1) % len(flavours)]
            for a in _algos(n, m):
                jobs.append((g, a, str(tmp_path / f"A-{f}-{a}"), str(tmp_path / f"B-{m}-{g}-{a}"), K1, [K2]))
                back_jobs.append(((m, f, g, a), (f, a, str(tmp_path / f"B-{m}-{g}-{a}"), None, K1 + K2, [K3])))
        got = ranks(m).run(R.session, jobs, timeout=600)[0]
        for (g, a, src, *_), rec in zip(jobs, got):
            assert_same(rec[0], ref[(flavours[(flavours.index(g) - 1) % 4], a)][1],
                        f"{n} ranks -> {m} ranks ({os.path.basename(src)} loaded into {g}, {a})")
    got = ranks(n).run(R.session, [j for _, j in back_jobs], timeout=600)[0]
    for ((m, f, g, a), _), rec in zip(back_jobs, got):
        assert_same(rec[0], ref[(f, a)][2], f"{n} -> {m} ({g}) -> {n} ({f}), {a}")


# ---------------------------------------------------------------------------
# against upstream
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ws", [2, 3])
@pytest.mark.parametrize("algo", ["Adam", "Adagrad"])
def test_fsdp_entry_points_match_upstream(ranks, ws, algo, backend):
    for rank, triples in enumerate(ranks(ws, backend).run(R.fsdp_against_upstream, "fsdp", algo, backend, timeout=300)):
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flavour,ws,algo", [("fsdp", 3, "Adam"), ("fsdp_orig", 2, "Adagrad")]
                         + ([("fsdp", 2, "SGD"), ("fsdp_orig", 3, "AdamW")] if FULL else []))
def test_fsdp_sharded_and_rank0_load_match_upstream(ranks, flavour, ws, algo, backend):
    """sharded_optim_state_dict, optim_state_dict under SHARDED/LOCAL_STATE_DICT (ShardedTensor
    state: local chunks and global metadata), flatten_sharded_optim_state_dict,
    optim_state_dict_to_load (SHARDED, and FULL with rank0_only): as upstream, bit for bit."""
    pool = ranks(ws, backend)
    for rank, triples in enumerate(pool.run(R.fsdp_sharded_against_upstream, flavour, algo, backend, timeout=300)):
        names = [name for name, *_ in triples]
        assert len(names) == 7, names
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp_orig_params_upstream_mislabels_state(ranks, backend):
    """torch 2.13's FSDP.full_optim_state_dict with use_orig_params=True hands out each
    exp_avg that is not the optimizer's (after one step on 2 ranks it equals exp_avg_sq).
    Ours equals the single-process optimizer; the loaders agree with upstream's."""
    pool = ranks(2, backend)
    for rank, triples in enumerate(pool.run(R.fsdp_against_upstream, "fsdp_orig", "Adam", backend, timeout=300)):
        by_name = {name: (ours, theirs) for name, ours, theirs in triples}
        assert_same(*by_name["full vs single process"], f"rank {rank}: ours vs the single-process optimizer")
        mine, theirs = by_name["full_optim_state_dict(rank0_only=False)"]
        assert list(mine["state"]) == list(theirs["state"])
        for fqn, st in theirs["state"].items():  # the pinned upstream bug
            assert compare(st["exp_avg"], mine["state"][fqn]["exp_avg"]) is not None, f"{fqn}: upstream got fixed?"
        assert_same(*by_name["our loaders leave the input unchanged"], f"rank {rank}")
        for name in ("optim_state_dict_to_load", "shard_full_optim_state_dict", "scatter_full_optim_state_dict"):
            # parameter ids in upstream's order too: the model's parameter order, not the optimizer's
            assert_same(*by_name[name], f"rank {rank}: {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ["AdamW", "SGD"])
def test_fully_shard_get_set_match_upstream(ranks, algo, backend):
    for rank, triples in enumerate(ranks(3, backend).run(R.fsdp2_against_upstream, algo, backend, timeout=300)):
        assert len(triples) == 4 + 3 * 2 * 3, [name for name, *_ in triples]
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")
        if algo == "AdamW":  # upstream's full route turns the betas tuple into a list; so does ours
            by_name = {name: ours for name, ours, _ in triples}
            assert type(by_name["set_optimizer_state_dict(full) into a trained optimizer"]["param_groups"][0]["betas"]) is list
            assert type(by_name["set_optimizer_state_dict(sharded) into a trained optimizer"]["param_groups"][0]["betas"]) is tuple


def _plain_trained(algo="Adam", steps=2):
    model = R.build_plain()
    optim = R.make_optim(model, "plain", algo)
    R.train(model, optim, range(steps))
    return model, optim


def test_rekey_matches_upstream():
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, OptimStateKeyType as K
    model, optim = _plain_trained()
    sd = optim.state_dict()
    by_name = ost.rekey_optim_state_dict(sd, K.PARAM_NAME, model, optim=optim)
    assert_same(by_name, FSDP.rekey_optim_state_dict(sd, K.PARAM_NAME, model, optim=optim))
    back = ost.rekey_optim_state_dict(by_name, K.PARAM_ID, model, optim=optim)
    assert_same(back, FSDP.rekey_optim_state_dict(by_name, K.PARAM_ID, model, optim=optim))
    assert ost.rekey_optim_state_dict(sd, K.PARAM_ID, model, optim=optim) is sd  # as upstream
    # the order-keeping pair used for ZeRO and plain optimizers
    assert_same(ost.to_id_keyed(ost.to_fqn_keyed(sd, model, optim), model, optim), sd)


def test_fqn_keyed_matches_distributed_checkpoint():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model, optim = _plain_trained()
    ours = ost.to_fqn_keyed(optim.state_dict(), model, optim)
    assert_same(ours, get_optimizer_state_dict(model, optim))
    assert_same(ost.get_optimizer_state_dict(model, optim), get_optimizer_state_dict(model, optim))


def test_plain_shard_round_trip_and_full(tmp_path):
    model, optim = _plain_trained("Adagrad", steps=3)
    path = tmp_path / "optim.0.pt"
    ost.save_optim_state_shard(optim, model, path)
    fresh = R.build_plain()
    fresh_opt = R.make_optim(fresh, "plain", "Adagrad")
    ost.load_optim_state_shards(fresh_opt, fresh, [path])
    assert_same(fresh_opt.state_dict(), optim.state_dict())
    assert_same(R.normalise(ost.shards_to_full([path])), R.normalise(ost.to_fqn_keyed(optim.state_dict(), model, optim)))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------

def _shard():
    model, optim = _plain_trained()
    return ost.optim_state_shard(optim, model)


def _edit_missing(s):
    s["params"].pop("head.weight")
    s["state"].pop("head.weight")
    s["kinds"].pop("head.weight")
    s["param_groups"][0]["params"].remove("head.weight")


def _edit_extra(s):
    s["param_groups"][1]["params"].append("block.extra")
    s["params"]["block.extra"] = {"shape": [3], "dtype": "torch.float32", "start": 0, "end": 3}


def _edit_shape(s):
    s["params"]["emb.bias"]["shape"] = [6]


def _edit_dtype(s):
    s["params"]["block.gain"]["dtype"] = "torch.float64"


def _edit_state_numel(s):
    s["state"]["emb.bias"]["exp_avg"] = s["state"]["emb.bias"]["exp_avg"][:4]


BAD = [
    (_edit_missing, "'head.weight' is missing"),
    (_edit_extra, "'block.extra'"),
    (_edit_shape, "'emb.bias': shape (6,) in the checkpoint, (5,) here"),
    (_edit_dtype, "'block.gain': dtype torch.float64 in the checkpoint, torch.float32 here"),
    (_edit_state_numel, "'emb.bias': state 'exp_avg' has 4 elements for a range of 5"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[e.__name__ for e, _ in BAD])
def test_bad_shard_raises_before_loading(edit, message):
    shard = _shard()
    edit(shard)
    before = copy.deepcopy(shard)
    model, optim = _plain_trained(steps=1)
    sd_before = copy.deepcopy(optim.state_dict())
    with pytest.raises(ost.OptimStateError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ost.load_optim_state_shards(optim, model, [shard])
    assert_same(optim.state_dict(), sd_before, "optimizer after a refused load")
    assert_same(shard, before, "the caller's shard")


def test_other_algorithm_and_missing_shard_refused():
    shard = _shard()
    model = R.build_plain()
    sgd = R.make_optim(model, "plain", "SGD")
    with pytest.raises(ost.OptimStateError, match="holds Adam state; this optimizer is SGD"):
        ost.load_optim_state_shards(sgd, model, [shard])
    assert sgd.state_dict()["state"] == {}
    two = dict(shard, world_size=2)
    with pytest.raises(ost.OptimStateError, match=r"missing rank \[1\]"):
        ost.load_optim_state_shards(R.make_optim(model, "plain", "Adam"), model, [two])


def test_full_dict_errors_name_the_parameter():
    model, optim = _plain_trained()
    full = ost.to_fqn_keyed(optim.state_dict(), model, optim)
    bad = copy.deepcopy(full)
    bad["state"]["head.bias"]["exp_avg"] = torch.zeros(3)
    before = copy.deepcopy(bad)
    with pytest.raises(ost.OptimStateError, match=r"'head.bias': state 'exp_avg' has shape \(3,\), the parameter \(2,\)"):
        ost.load_full_optim_state(optim, model, bad)
    assert_same(bad, before)
    bad = copy.deepcopy(full)
    bad["state"]["head.bias"]["exp_avg"] = bad["state"]["head.bias"]["exp_avg"].double()
    with pytest.raises(ost.OptimStateError, match="'head.bias': state 'exp_avg' is torch.float64, the parameter torch.float32"):
        ost.load_full_optim_state(optim, model, bad)


def test_scatter_bad_input_raises_on_every_rank(ranks):
    for rank, (message, full, before) in enumerate(ranks(2).run(R.scatter_bad_input, timeout=300)):
        assert message is not None and "'head.bias': state 'exp_avg' has shape (3,), the parameter (2,)" in message, \
            f"rank {rank}: {message}"
        assert_same(full, before, f"rank {rank}: the caller's dict")


def test_files_load_weights_only(tmp_path):
    model, optim = _plain_trained()
    path = tmp_path / "optim.0.pt"
    shard = ost.optim_state_shard(optim, model)
    shard["param_groups"][0]["evil"] = compare  # not loadable with weights_only=True
    torch.save(shard, path)
    with pytest.raises(Exception, match="weights_only|Weights only"):
        ost.load_optim_state_shards(optim, model, [path])


# ---------------------------------------------------------------------------
# FSDP for NamedOptimizer (is_named_optimizer) and with a device mesh (DTensor state)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flavour,ws,algo", [("fsdp", 2, "Adam"), ("fsdp_orig", 3, "Adam")]
                         + ([("fsdp", 3, "Adagrad"), ("fsdp_orig", 2, "SGD")] if FULL else []))
def test_fsdp_is_named_optimizer_matches_upstream(ranks, flavour, ws, algo, backend):
    """optim_state_dict_to_load(is_named_optimizer=True): keys are the names in the FSDP model's
    named_parameters(), groups list them sorted, and (use_orig_params) a parameter with no
    elements on a rank keeps the optimizer's own (empty) state, as upstream."""
    empty = 0
    for rank, triples in enumerate(ranks(ws, backend).run(R.fsdp_named_against_upstream, flavour, algo, backend,
                                                          timeout=300)):
        by_name = {name: (ours, theirs) for name, ours, theirs in triples}
        assert len(by_name) == 4, list(by_name)
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")
        ours = by_name["FULL"][0]
        assert ours["state"] and all(isinstance(k, str) and "_fsdp_wrapped_module" in k for k in ours["state"])
        empty += by_name["parameters with empty shards here"][0]
    assert empty or flavour == "fsdp", "the empty-shard branch never ran"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flavour,ws,algo", [("fsdp", 3, "Adam"), ("fsdp_orig", 2, "AdamW")]
                         + ([("fsdp", 2, "SGD"), ("fsdp_orig", 3, "Adagrad")] if FULL else []))
def test_fsdp_device_mesh_dtensor_state_matches_upstream(ranks, flavour, ws, algo, backend):
    """FSDP with a device_mesh: SHARDED_STATE_DICT optimizer state is DTensor (Shard(0) chunks),
    bit for bit upstream's, and loads back as upstream's loader does."""
    for rank, triples in enumerate(ranks(ws, backend).run(R.fsdp_dtensor_against_upstream, flavour, algo, backend,
                                                          timeout=300)):
        by_name = {name: (ours, theirs) for name, ours, theirs in triples}
        assert len(by_name) == 5, list(by_name)
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")
        assert "DTensor" in by_name["types"][0]
        assert "DeviceMesh is not compatible with LOCAL_STATE_DICT" in by_name["LOCAL_STATE_DICT with a device_mesh"][0]


# ---------------------------------------------------------------------------
# non-tensor and absent state: None, no state at all, parameters without state, 0-dim step
# ---------------------------------------------------------------------------

GATHERS = ("full_optim_state_dict(rank0_only=True)", "full_optim_state_dict(rank0_only=False)", "optim_state_dict",
           "sharded_optim_state_dict")
KINDS = [("fsdp", "LegacySGD"), ("fsdp_orig", "LegacySGD"), ("fsdp", "SGD0"), ("fsdp_orig", "LateAdam")]


@pytest.mark.parametrize("flavour,algo", KINDS)
def test_state_kinds_match_upstream(ranks, flavour, algo):
    """None state (LegacySGD), no state at all (SGD momentum=0), parameters without state
    (frozen ones, LateAdam's head.bias before its first gradient), 0-dim step (Adam): every FSDP
    entry point equals upstream's, and the full state the single-process optimizer's. On 2 ranks
    upstream's rank0_only loaders are left out (they raise on rank 0 alone with None state)."""
    for rank, triples in enumerate(ranks(2).run(R.state_kinds_against_upstream, flavour, algo, False, timeout=300)):
        assert len(triples) == 12, [n for n, *_ in triples]
        for name, ours, theirs in triples:
            if algo == "LateAdam" and name in GATHERS:
                # pinned: with use_orig_params upstream cannot gather while a parameter has no state
                assert isinstance(theirs, tuple) and theirs[:2] == ("raised", "RuntimeError") \
                    and "head.bias is not in the optimizer state" in theirs[2], f"{name}: upstream got fixed? {theirs!r}"
                continue
            assert_same(ours, theirs, f"rank {rank}: {name}")
        full = dict((n, o) for n, o, _ in triples)["full_optim_state_dict(rank0_only=False)"]["state"]
        assert "frozen.weight" not in full
        if algo == "LegacySGD":
            assert full and all(st == {"momentum_buffer": None} for st in full.values()), full
        if algo == "SGD0":
            assert full == {}
        if algo == "LateAdam":
            assert "head.bias" not in full and full["head.weight"]["step"].dim() == 0


@pytest.mark.parametrize("flavour,algo", KINDS[:2])
def test_upstream_rank0_loads_fail_on_none_state(ranks, flavour, algo):
    """Pinned: torch 2.13's rank0_only loaders (scatter_full_optim_state_dict,
    optim_state_dict_to_load under FULL rank0_only) call .cpu() on every state value on rank 0,
    so a None state raises AttributeError (shown on 1 rank, where nothing is left waiting).
    Ours load it; everything else still equals upstream."""
    triples = ranks(1).run(R.state_kinds_against_upstream, flavour, algo, True, timeout=300)[0]
    by_name = {name: (ours, theirs) for name, ours, theirs in triples}
    for name in ("optim_state_dict_to_load(FULL, rank0_only)", "scatter_full_optim_state_dict"):
        ours, theirs = by_name.pop(name)
        assert theirs == R.UPSTREAM_RANK0_LOAD_NONE_STATE, f"{name}: upstream got fixed? {theirs!r}"
        assert_same(ours, by_name["optim_state_dict_to_load"][0], f"ours: {name} vs the other loaders")
    for name, (ours, theirs) in by_name.items():
        assert_same(ours, theirs, name)


@pytest.mark.parametrize("algo", ["LegacySGD", "SGD0"])
def test_fully_shard_state_kinds_match_upstream(ranks, algo):
    """get/set_optimizer_state_dict with None state and with no state: as upstream; where
    upstream's set(full) raises (no tensor in the optimizer's state to take a device from: pinned)
    ours loads the checkpoint."""
    for rank, triples in enumerate(ranks(2).run(R.fsdp2_against_upstream, algo, timeout=300)):
        names = [n for n, *_ in triples]
        assert sum(n.endswith(": upstream raises") for n in names) == 4, names  # full and full-broadcast, x2
        for name, ours, theirs in triples:
            assert_same(ours, theirs, f"rank {rank}: {name}")


STATE_KIND_PAIRS = [(2, 3), (3, 2)] + ([(1, 4), (4, 1), (2, 4), (4, 3)] if FULL else [])


@pytest.mark.parametrize("n,m", STATE_KIND_PAIRS)
def test_reshard_round_trips_state_kinds(ranks, tmp_path, n, m):
    """N -> M -> N through files with None state, no state and late state: every flavour
    conversion (LateAdam: the flavours that keep parameters apart; a FlatParameter gives the
    late parameter zero-gradient state) continues bit for bit as the uninterrupted run."""
    chains = {"LegacySGD": R.FLAVOURS, "SGD0": R.FLAVOURS, "LateAdam": ("zero", "fsdp_orig", "fsdp2")}
    ref_jobs = [(f, a, None, str(tmp_path / f"A-{f}-{a}"), 0, [K1, K2, K3]) for a, fl in chains.items() for f in fl]
    ref = dict(zip([(f, a) for f, a, *_ in ref_jobs], ranks(n).run(R.session, ref_jobs, timeout=600)[0]))
    plain = {a: ref[(chains[a][0], a)] for a in chains}
    for (f, a), rec in ref.items():
        assert_same(rec, plain[a], f"N={n} {a}: {f} vs {chains[a][0]}")
    jobs, back = [], []
    for a, fl in chains.items():
        for i, f in enumerate(fl):
            g = fl[(i + 1) % len(fl)]
            jobs.append((g, a, str(tmp_path / f"A-{f}-{a}"), str(tmp_path / f"B-{g}-{a}"), K1, [K2]))
            back.append((f, a, str(tmp_path / f"B-{g}-{a}"), None, K1 + K2, [K3]))
    for (g, a, src, *_), rec in zip(jobs, ranks(m).run(R.session, jobs, timeout=600)[0]):
        assert_same(rec[0], plain[a][1], f"{n} -> {m} ranks: {os.path.basename(src)} into {g}")
    for (f, a, src, *_), rec in zip(back, ranks(n).run(R.session, back, timeout=600)[0]):
        assert_same(rec[0], plain[a][2], f"{n} -> {m} -> {n}: {os.path.basename(src)} into {f}")


# ---------------------------------------------------------------------------
# NamedOptimizer checkpoints
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["Adam"] + (["AdamW", "SGD", "Adagrad"] if FULL else []))
def test_named_optimizer_checkpoints_cross_load(ranks, tmp_path, algo):
    """NamedOptimizer's state_dict equals torch's _NamedOptimizer's (keys in the wrapped
    optimizer's state order, which is to_fqn_keyed's and DCP's too; each group's FQNs sorted
    and "params" first, where DCP keeps the optimizer's order and puts "params" last); it loads
    into a plain optimizer, ZeRO, FSDP and fully_shard, and theirs into NamedOptimizer, all
    continuing bit for bit."""
    for rank, triples in enumerate(ranks(2).run(R.named_cross_load, algo, str(tmp_path), timeout=600)):
        assert len(triples) == 3 + 9 + 1 + 4 * 3, [n for n, *_ in triples]
        for name, got, want in triples:
            assert_same(got, want, f"rank {rank}: {name}")
