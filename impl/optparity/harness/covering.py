"""Interactions by construction (issue 17): a covering design over the conditions a training loop
combines, so that every PAIR of conditions that can coexist meets in at least one case of the
default level (and every triple in the full level's cases).

The factors of one algorithm (FACTORS, their values from its description, harness/algorithms/):
path, dtype, the parameter set's shapes / element types / gradient kind / groups (composed by
harness/params.py: "cover:SHAPES+ELEMENTS+GRADS+GROUPS"), the AMP recipe (none, the plain
GradScaler one of conditions.py, the recipes of harness/amp.py), intra-op threads, an LR
scheduler, the state-dict reload schedule, and the configuration (the defaults and the richest
one: matrix.representative). CONSTRAINTS name the combinations that cannot coexist, each with why.

The design is built by a greedy one-row-at-a-time generator (AETG's idea): each new row starts
from a not yet covered t-tuple and fills the other factors, in a seeded random order, with the
value covering most uncovered t-tuples among those a valid complete row can still take.
Deterministic: the same description gives the same rows, so case ids and seeds are stable.
"""
from __future__ import annotations

import functools
import itertools
import random
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from optparity.harness import params
from optparity.harness.algorithms import spec

AMP = ("none", "scaler", "unscale_clip", "two_optimizers", "bf16_autocast")
SCALER_RECIPES = ("scaler", "unscale_clip", "two_optimizers")
SCHEDULERS = ("none", "StepLR", "ReduceLROnPlateau")  # lr only: no option switched on by a scheduler
RELOADS = ("standard", "every_step")
THREADS = (1, 2)
SEED = 17
STEPS = 10  # past matrix.CROSS_LOAD (8): both reloads and the lr change happen, with steps after


@dataclass(frozen=True)
class Constraint:
    name: str
    why: str
    violated: Callable[[str, dict], bool]  # (algorithm, partial row) -> True when impossible


def _has(row: dict, **want) -> bool:
    """Every named factor is in the row with one of the given values (a tuple) or that value."""
    for k, v in want.items():
        if k not in row or row[k] not in (v if isinstance(v, tuple) else (v,)):
            return False
    return True


def _sgd_fused_low(algo: str, row: dict) -> bool:
    if algo != "SGD" or not _has(row, path="fused") or "config" not in row:
        return False
    from optparity.harness import matrix  # here, after the cheap tests: this runs for every partial row

    config = matrix.configs(algo)[row["config"]]
    low = row.get("dtype") in (torch.float16, torch.bfloat16) or (
        row.get("elements") == "dtype_mix" and row.get("dtype") == torch.float32)  # float32 mixes in bfloat16
    return bool(config.get("momentum")) and low


@functools.lru_cache(maxsize=None)
def torch_refuses(algo: str, config_index: int, path: str = "forloop", sparse: bool = False,
                  complex_: bool = False, empty: bool = False, gapped: bool = False,
                  second: bool = False) -> str | None:
    """The error torch's class raises in a few steps (each through a closure) on small parameters
    given this configuration and path, and sparse gradients, a complex dtype, a zero-element
    parameter or a transposed one; second: with the description's second-group overrides (a
    two-group case's second group). None when it takes them."""
    from optparity.harness import matrix

    dtype = torch.complex64 if complex_ else torch.float32
    p = torch.linspace(-1, 1, 6).reshape(3, 2).to(dtype)
    p = (p.t() if gapped else p.reshape(2, 3))[:, : 0 if empty else 3].requires_grad_(True)  # gapped: transposed
    ps = [p]
    kwargs = {**matrix.configs(algo)[config_index], **(spec(algo).second_group if second else {}),
              **{"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}.get(path, {})}

    def closure():
        for q in ps:
            g = q.detach() * 0.5 + 0.25  # a quadratic's gradient, laid out as q is
            q.grad = (torch.sparse_coo_tensor(torch.tensor([[0, 1], [2, 0]]), g[0, :2], q.shape, check_invariants=True)
                      if sparse and q is p else g)
        return torch.tensor(1.0)

    # one thread: this runs in the process that then forks the check's workers, and a parallel
    # region run here (sparse coalescing enters one whatever the size) leaves GNU OpenMP's pool
    # broken in forked children, so check.run would fall back to a single in-process worker
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = spec(algo).torch_class()(ps, **kwargs)
        for _ in range(STEPS // 2):
            opt.step(closure)
    except Exception as e:  # noqa: BLE001 - any refusal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        torch.set_num_threads(previous)
    return None


def _strong_wolfe_half_sizes(algo: str, row: dict) -> bool:
    if spec(algo).kind != "closure" or not _has(row, dtype=torch.float16, shapes="sizes") or "config" not in row:
        return False
    from optparity.harness import matrix

    return matrix.configs(algo)[row["config"]].get("line_search_fn") == "strong_wolfe"


def _refused(algo: str, row: dict, **what) -> bool:
    if "config" not in row:
        return False
    seconds = (False, True) if row.get("groups", "one") != "one" else (False,)
    return any(torch_refuses(algo, row["config"], row.get("path", "forloop"), second=s, **what) is not None
               for s in seconds)


CONSTRAINTS = (
    Constraint("sparse gradients x fused", "torch's fused CPU kernels take dense gradients only: both sides "
               "raise at the first step, so the case would check nothing",
               lambda a, r: _has(r, grads="sparse", path="fused")),
    Constraint("complex x float16/bfloat16", "no complex32 optimizer math: the complex sets are complex64 "
               "and complex128 (the complex partner of a real dtype)",
               lambda a, r: _has(r, elements="complex", dtype=(torch.float16, torch.bfloat16))),
    Constraint("float16 x GradScaler.unscale_", "GradScaler.unscale_ refuses float16 gradients "
               "(allow_fp16=False); only a fused optimizer stepped without unscale_ takes them, its kernel "
               "given grad_scale",
               lambda a, r: _has(r, dtype=torch.float16, amp=SCALER_RECIPES)
               and not (_has(r, amp="scaler") and (r.get("path") in (None, "fused")))),
    Constraint("two optimizers x added_group", "the second group becomes the second optimizer: nothing is "
               "left to give add_param_group",
               lambda a, r: _has(r, amp="two_optimizers", groups="added_group")),
    Constraint("GradScaler x closure-only optimizer", "GradScaler.step refuses a closure and LBFGS can only "
               "be stepped with one",
               lambda a, r: spec(a).kind == "closure" and _has(r, amp=SCALER_RECIPES)),
    Constraint("complex x GradScaler", "GradScaler's unscale kernel (_amp_foreach_non_finite_check_and_unscale_) "
               "is not implemented for complex tensors on the CPU: both sides raise",
               lambda a, r: _has(r, elements="complex", amp=SCALER_RECIPES)),
    Constraint("sparse gradients x complex", "torch's sparse-gradient paths (SGD's, Adagrad's) take real "
               "tensors only",
               lambda a, r: _has(r, grads="sparse", elements="complex")),
    Constraint("sparse gradients x configuration", "torch's class raises for sparse gradients under some "
               "options (SGD's momentum or weight_decay: add(sparse, dense); Adagrad's weight_decay), in the "
               "configuration or the second group's overrides, found by trying it (torch_refuses)",
               lambda a, r: _has(r, grads="sparse") and spec(a).kind != "sparse" and _refused(a, r, sparse=True)),
    Constraint("complex x path", "a path of torch's that takes no complex parameters (every fused one: "
               "fused=True requires all the params to be floating point), found by trying it (torch_refuses)",
               lambda a, r: _has(r, elements="complex") and "path" in r and _refused(a, r, complex_=True)),
    Constraint("layouts x class", "a class that flattens every gradient with .view(-1) (LBFGS) raises on a "
               "transposed or channels_last parameter, found by trying it (torch_refuses)",
               lambda a, r: _has(r, shapes="layouts") and _refused(a, {"path": "default", **r}, gapped=True)),
    Constraint("dtype mix x closure-only class", "LBFGS (kind closure) joins every gradient into one flat "
               "vector and takes dot products of its history: with a second dtype torch raises (dot: expected "
               "both vectors to have same dtype) within a few steps",
               lambda a, r: _has(r, elements="dtype_mix") and spec(a).kind == "closure"),
    Constraint("float16 x autocast around a closure", "LBFGS's closure computes the loss inside "
               "torch.autocast(bfloat16): float16 parameters make autocast raise (Unexpected floating "
               "ScalarType in at::autocast::prioritize)",
               lambda a, r: spec(a).kind == "closure" and _has(r, dtype=torch.float16, amp="bf16_autocast")),
    Constraint("float16 x degenerate shapes x closure-only class", "LBFGS's line search over the degenerate "
               "set's 12,000 float16 elements overflows float16 (value cannot be converted to type c10::Half "
               "without overflow): torch raises within a few steps",
               lambda a, r: spec(a).kind == "closure" and _has(r, dtype=torch.float16, shapes="degenerate_nonempty")),
    Constraint("float16 x strong-Wolfe line search x sizes set", "LBFGS's strong-Wolfe search over the sizes "
               "set's large float16 parameters overflows float16 the same way (its trial step's loss and "
               "directional derivative leave float16's range): both sides raise within a few steps",
               _strong_wolfe_half_sizes),
    Constraint("sparse gradients x clip_grad_norm_", "clip_grad_norm_ computes the norm of dense gradients "
               "only (torch raises for sparse ones)",
               lambda a, r: _has(r, grads="sparse", amp=("unscale_clip", "two_optimizers"))),
    Constraint("SGD fused momentum x low precision (upstream)", "torch 2.13's fused CPU SGD with momentum "
               "gives a nondeterministic momentum_buffer for float16/bfloat16 (matrix._upstream_nondeterministic)",
               _sgd_fused_low),
)


def factors(algo: str) -> dict[str, tuple]:
    """Each factor's values for `algo`, from its description: the paths it has, the dtypes it
    supports, how it is fed (dense shapes; a "matrix" or "sparse" algorithm has its own set),
    complex and sparse gradients when it takes them, groups when torch's class does."""
    from optparity.harness import levels, matrix

    s = spec(algo)
    paths = tuple(p for p in matrix.PATHS if matrix._runs(algo, p, torch.float32))
    dtypes = (torch.float32, torch.float64) + ((torch.bfloat16, torch.float16) if s.low_precision else ())
    shapes = params.SHAPES if s.kind in ("dense", "closure") else (matrix.param_sets_for(algo, ("mixed",))[0],)
    if "degenerate" in shapes and torch_refuses(algo, 0, "default", empty=True):
        # torch's class raises on a zero-element parameter (Adafactor: ZeroDivisionError): the
        # other degenerate shapes still meet every condition
        shapes = tuple("degenerate_nonempty" if x == "degenerate" else x for x in shapes)
    elements = ("uniform", "dtype_mix") + (("complex",) if s.complex else ())
    grads = ("sparse",) if s.kind == "sparse" else ("dense", "sparse") if s.sparse_grads else ("dense",)
    groups = ("one", "groups", "added_group") if levels.takes_param_groups(algo) else ("one",)
    return {"path": paths, "dtype": dtypes, "shapes": shapes, "elements": elements, "grads": grads,
            "groups": groups, "amp": AMP, "threads": THREADS, "scheduler": SCHEDULERS, "reload": RELOADS,
            "config": tuple(matrix.representative(algo))}


def violated(algo: str, row: dict) -> Constraint | None:
    return next((c for c in CONSTRAINTS if c.violated(algo, row)), None)


def _completable(algo: str, row: dict, domains: dict, order: list[str]) -> bool:
    """Can `row` be completed to a full row no constraint forbids (depth-first)?"""
    if violated(algo, row):
        return False
    free = [f for f in order if f not in row]
    if not free:
        return True
    f = free[0]
    return any(_completable(algo, {**row, f: v}, domains, order) for v in domains[f])


def compatible_tuples(algo: str, strength: int = 2) -> set[tuple]:
    """Every t-tuple of (factor, value) pairs some valid complete row contains."""
    domains = factors(algo)
    names = list(domains)
    out = set()
    for fs in itertools.combinations(names, strength):
        for values in itertools.product(*(domains[f] for f in fs)):
            row = dict(zip(fs, values))
            if _completable(algo, row, domains, names):
                out.add(tuple(zip(fs, values)))
    return out


def _tuples_of(row: dict, strength: int) -> set[tuple]:
    return {tuple((f, row[f]) for f in fs) for fs in itertools.combinations(sorted(row, key=_key), strength)}


_ORDER = ("path", "dtype", "shapes", "elements", "grads", "groups", "amp", "threads", "scheduler", "reload", "config")


def _key(f: str) -> int:
    return _ORDER.index(f)


@functools.lru_cache(maxsize=None)
def design(algo: str, strength: int = 2) -> tuple[tuple[tuple[str, object], ...], ...]:
    """The rows (each a tuple of (factor, value) in _ORDER) covering every compatible t-tuple."""
    domains = factors(algo)
    names = list(domains)
    uncovered = {tuple(sorted(t, key=lambda fv: _key(fv[0]))) for t in compatible_tuples(algo, strength)}
    rng = random.Random(f"{SEED}/{algo}/{strength}")
    rows = []
    while uncovered:
        seed_tuple = min(uncovered, key=lambda t: [(_key(f), repr(v)) for f, v in t])
        row = dict(seed_tuple)
        rest = [f for f in names if f not in row]
        rng.shuffle(rest)
        for f in rest:
            best, best_gain = None, -1
            for v in domains[f]:
                trial = {**row, f: v}
                if not _completable(algo, trial, domains, names):
                    continue
                gain = sum(1 for t in _tuples_of(trial, strength) if t in uncovered and any(x[0] == f for x in t))
                if gain > best_gain:
                    best, best_gain = v, gain
            row[f] = best
        uncovered -= _tuples_of(row, strength)
        rows.append(tuple((f, row[f]) for f in _ORDER))
    return tuple(rows)


def case_of(algo: str, row: dict, cost: str = "cheap", steps: int = STEPS):
    """The matrix.Case a design row describes (axis "covering")."""
    from optparity.harness import matrix

    amp_value = row["amp"]
    pset = params.composed_name(row["shapes"], row["elements"], row["grads"], row["groups"])
    case = matrix.Case(algo, matrix.configs(algo)[row["config"]], row["path"], row["dtype"], pset,
                       steps=steps, config_index=row["config"], second_group=spec(algo).second_group,
                       axis="covering", cost=cost, threads=row["threads"],
                       amp=amp_value in SCALER_RECIPES,
                       amp_recipe=amp_value if amp_value in ("unscale_clip", "two_optimizers", "bf16_autocast") else None,
                       scheduler=None if row["scheduler"] == "none" else row["scheduler"], reload=row["reload"])
    case.seed = zlib.crc32(case.id.encode())
    return case


def row_of(case) -> dict | None:
    """The factor values a case carries (any case of the matrix: base, edge or covering), read
    from the case itself; None for a case whose parameter set is none of the factors' (sizes_full...)."""
    feats = params.features(case.param_set)
    s = spec(case.algorithm)
    shape = next((x for x in params.SHAPES + ("degenerate_nonempty",) if x in feats), None)
    if case.param_set in ("mixed", "groups", "added_group", "complex", "sparse"):
        shape = "plain"
    elif s.kind in ("matrix", "sparse"):
        from optparity.harness import matrix

        shape = matrix.param_sets_for(case.algorithm, ("mixed",))[0] if shape in (None, "plain") else shape
    if shape is None:
        return None
    if "complex" in feats:
        elements = "complex"
    elif "dtype_mix" in feats:
        elements = "dtype_mix"
    else:
        elements = "uniform"
    recipe = getattr(case, "amp_recipe", None)
    amp_value = recipe or ("scaler" if case.amp else "none")
    groups = "added_group" if "added_group" in feats else "groups" if "groups" in feats else "one"
    return {"path": case.path, "dtype": case.dtype, "shapes": shape, "elements": elements,
            "grads": "sparse" if "sparse" in feats or s.kind == "sparse" else "dense", "groups": groups,
            "amp": amp_value, "threads": case.threads, "scheduler": case.scheduler or "none",
            "reload": getattr(case, "reload", "standard"), "config": case.config_index}


def covering_cases(algo: str, paths, steps: int = STEPS, full: bool = True) -> list:
    """The default level's pairwise cases, then the full level's triples (cost "expensive") not
    already among them; rows on a path outside `paths` are left out."""
    out, seen = [], set()
    for strength, cost in ((2, "cheap"), (3, "expensive")):
        if cost == "expensive" and not full:
            continue
        for row in design(algo, strength):
            row = dict(row)
            if row["path"] not in paths:
                continue
            case = case_of(algo, row, cost, min(steps, STEPS))
            if case.id not in seen:
                seen.add(case.id)
                out.append(case)
    return out

