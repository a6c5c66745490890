"""The case matrix: which configurations, paths, dtypes and parameter sets every check runs.

For each algorithm: every hyperparameter combination torch's own optimizer tests use
(torch.testing._internal.common_optimizers, CPU) plus our own additions (both listed in the
algorithm's description, harness/algorithms/<algo>.py), crossed with the
implementation path, the dtype and the parameter set. tests/test_matrix.py proves the torch
configurations are all here.
"""
from __future__ import annotations

import inspect
import itertools
import zlib
from dataclasses import dataclass, field

import torch

from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU, spec

# "default" passes neither foreach nor fused: the optimizer's own choice must match torch's.
PATHS = ("forloop", "foreach", "fused", "default")
# "added_group" is "groups" with the second group given to add_param_group after construction;
# "sparse" (sparse gradients) only for the algorithms that take them (harness/params.py).
PARAM_SETS = ("mixed", "groups", "added_group", "complex", "sparse")
DTYPES = (torch.float32, torch.float64)
STEPS = 12
# A fresh optimizer is rebuilt from its own state_dict after RELOAD_OWN steps, and the candidate
# and reference swap state dicts after CROSS_LOAD steps.
RELOAD_OWN = 4
CROSS_LOAD = 8
# After LR_CHANGE steps every group's lr is halved, as a scheduler would: hyperparameters must be
# read from the param groups at every step, not cached.
LR_CHANGE = 6
# The rollback axis: each side's state_dict is saved after the first step of each pair (0: before any
# step, when no parameter has state yet) and loaded back into the same, since trained, optimizer after
# the second. torch.optim's load_state_dict replaces the whole state: state newer than the checkpoint
# must go, also for parameters the checkpoint has none for.
ROLLBACKS = ((0, 5), (3, 7))


def configs(algo: str, device: str = "cpu") -> list[dict]:
    """torch's own test configurations, then ours (harness/algorithms/<algo>.py), then those the
    installed torch's tests add when it is not the mirrored release (harness/torch_tests.py); on
    CUDA also the ones torch's tests run on CUDA only (the description's cuda_configs, after the
    rest: CPU indices unchanged)."""
    from optparity.harness.torch_tests import configs_added_by_installed_torch

    cfgs = spec(algo).configs()
    # on a release optparity does not mirror, the installed torch's tests may add configurations
    cfgs += configs_added_by_installed_torch(algo, "cpu", cfgs)
    if device_type(device) == "cuda":
        cfgs += [c for c in spec(algo).cuda_configs if not any(same_config(c, d) for d in cfgs)]
        cfgs += configs_added_by_installed_torch(algo, "cuda", cfgs)
    return cfgs


def device_type(device: str | None) -> str:
    """"cuda" for "cuda" / "cuda:1", "cpu" for "cpu" (and None)."""
    return (device or "cpu").partition(":")[0]


def same_config(a: dict, b: dict) -> bool:
    """The same keys and values, tensors compared by value (a config's `lr=tensor(0.01)`)."""
    def same(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and torch.equal(x, y))
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(map(same, x, y))
        return type(x) is type(y) and x == y

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


def format_config(config: dict) -> str:
    def fmt(v):
        if isinstance(v, torch.Tensor):
            return f"tensor({v.item():g})"
        if isinstance(v, tuple):
            return "(" + ",".join(fmt(x) for x in v) + ")"
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={fmt(v)}" for k, v in config.items()) or "defaults"


@dataclass
class Case:
    algorithm: str
    config: dict
    path: str
    dtype: torch.dtype
    param_set: str
    steps: int = STEPS
    seed: int = 0
    config_index: int = 0
    second_group: dict = field(default_factory=dict)
    # Edge conditions (see EDGE_AXES below): which axis built the case ("base" for the ordinary
    # matrix), "cheap" or "expensive" (only the full level runs those), torch intra-op threads
    # inside the case, torch.set_default_dtype inside it, steps driven by torch.amp.GradScaler.
    axis: str = "base"
    cost: str = "cheap"
    threads: int = 1
    default_dtype: torch.dtype | None = None
    amp: bool = False
    scheduler: str | None = None  # an LR scheduler recipe stepped alongside (harness/schedulers.py)
    # issue 17 (harness/covering.py): an AMP recipe of harness/amp.py, and when the state-dict
    # reloads happen ("standard": own at RELOAD_OWN, cross at CROSS_LOAD; "every_step": own after
    # every other step too, as a run resumed from a checkpoint at any step)
    amp_recipe: str | None = None
    reload: str = "standard"
    # Where the candidate's parameters, gradients and state live ("cpu", "cuda", "cuda:1"), and the
    # reference's when it is elsewhere (None: the same device). Neither changes the seed: a case on
    # CUDA starts from the numbers of the same case on the CPU (harness/params.py).
    device: str = "cpu"
    reference_device: str | None = None

    @property
    def across_devices(self) -> bool:
        """The reference runs on another device: distances are measured, not claimed zero."""
        return self.reference_device is not None and self.reference_device != self.device

    @property
    def id(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        text = (f"{self.algorithm}/{self.path}/{dtype}/{self.param_set}/"
                f"c{self.config_index}[{format_config(self.config)}]")
        if self.axis != "base":
            text += f"/{self.axis}"
            if self.threads != 1:
                text += f",threads={self.threads}"
            if self.default_dtype is not None:
                text += f",default_dtype={str(self.default_dtype).replace('torch.', '')}"
            if self.amp:
                text += ",GradScaler"
            if self.scheduler:
                text += f",{self.scheduler}"
            if self.amp_recipe:
                text += f",{self.amp_recipe}"
            if self.reload != "standard":
                text += f",reload={self.reload}"
            if self.steps != STEPS:
                text += f",steps={self.steps}"
        if self.device != "cpu" or self.across_devices:  # CPU ids are what they always were (goldens)
            text += f"@{self.device}"
            if self.across_devices:
                text += f",reference={self.reference_device}"
        return text

    def path_kwargs(self) -> dict:
        return {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True},
                "default": {}}[self.path]


def param_sets_for(algo: str, param_sets) -> list[str]:
    """The requested sets as `algo` is fed (its description's kind): a "matrix" algorithm gets
    their 2-D forms, a "sparse" one their sparse-gradient forms; sets it cannot take are dropped."""
    s = spec(algo)
    prefix = {"matrix": "matrix", "sparse": "sparse_grads"}.get(s.kind)
    out = []
    for name in param_sets:
        if prefix is not None:
            if s.kind == "matrix" and name == "sparse":
                continue
            name = {"mixed": prefix, "sparse": prefix, "groups": f"{prefix}_groups",
                    "added_group": f"{prefix}_added_group"}.get(name)
        elif (name == "complex" and not s.complex) or (name == "sparse" and not s.sparse_grads):
            continue
        if name is not None and name not in out:
            out.append(name)
    return out


def _runs(algo: str, path: str, dtype: torch.dtype, devices=("cpu",)) -> bool:
    """Does `algo` have this path and dtype (on each of `devices`)? A path whose flag torch's class
    does not take (Muon and SparseAdam have no foreach) is left out rather than run to a TypeError;
    fused is there on the CPU for FUSED_ON_CPU, on CUDA for the algorithms with fused_on_cuda."""
    s = spec(algo)
    if path == "fused" and not all(_has_fused(algo, d) for d in devices):
        return False
    if path == "foreach" and not s.foreach:
        return False
    if path in ("forloop", "foreach") and "foreach" not in inspect.signature(s.torch_class()).parameters:
        return False
    return s.low_precision or dtype not in (torch.float16, torch.bfloat16)


def _refused_across(config: dict, devices) -> bool:
    """A CUDA side against a CPU side with capturable=True: torch's CPU side refuses it at its first
    step (capturable needs the state on a CUDA-like device), so the case could only differ."""
    return bool(config.get("capturable")) and len({device_type(d) for d in devices}) > 1


def _has_fused(algo: str, device: str) -> bool:
    return spec(algo).fused_on_cuda if device_type(device) == "cuda" else algo in FUSED_ON_CPU


def _upstream_nondeterministic(algo: str, config: dict, path: str, dtype: torch.dtype, pset: str,
                               devices=("cpu",)) -> bool:
    """Cases whose reference is not deterministic, so no candidate can match it bit for bit:
    torch 2.13's fused CPU SGD with momentum on float16/bfloat16 tensors of 64+ elements gives a
    different momentum_buffer from run to run (an element now and then is garbage, e.g. -inf) from
    the second step on (docs/upstream-findings.md)."""
    low = dtype in (torch.float16, torch.bfloat16) or pset == "dtype_mix" or (
        # a composed mix (harness/params.py) brings bfloat16 beside float32
        pset.startswith("cover:") and "+dtype_mix+" in pset and dtype == torch.float32)
    on_cpu = any(device_type(d) == "cpu" for d in devices)  # the CPU kernel's fault, not CUDA's
    return algo == "SGD" and path == "fused" and bool(config.get("momentum")) and low and on_cpu


def build_cases(algorithms=ALGORITHMS, paths=PATHS, dtypes=DTYPES, param_sets=PARAM_SETS,
                steps: int | None = None, device: str = "cpu", reference_device: str | None = None,
                triples: bool = False) -> list[Case]:
    """The base matrix over `dtypes` x `param_sets`, then each algorithm's edge cases (which pick
    their own dtypes and parameter sets; `paths` narrows them too, `steps` caps all but long runs).
    steps None: each algorithm's own (its description's `steps`, else STEPS).

    device: where the candidate runs, reference_device: where the reference does (None: the same).
    A path or configuration is kept when both devices have it: fused where torch ships a fused
    kernel for that device, the descriptions' cuda_configs when both are CUDA devices. Seeds are those of the
    CPU cases, so every device starts from the same numbers.

    Then each algorithm's covering cases (harness/covering.py): every pair of compatible
    conditions, and with `triples` (the full level) every triple too, as "expensive" cases."""
    devices = (device,) if reference_device in (None, device) else (device, reference_device)
    config_device = "cuda" if all(device_type(d) == "cuda" for d in devices) else "cpu"
    cases = []
    asked = steps
    for algo in algorithms:
        steps = asked or spec(algo).steps or STEPS
        for index, config in enumerate(configs(algo, config_device)):
            if _refused_across(config, devices):
                continue
            for path, dtype, pset in itertools.product(paths, dtypes, param_sets_for(algo, param_sets)):
                if (not _runs(algo, path, dtype, devices)
                        or _upstream_nondeterministic(algo, config, path, dtype, pset, devices)):
                    continue
                case = Case(algo, config, path, dtype, pset, steps=steps, config_index=index,
                            second_group=spec(algo).second_group)
                case.seed = zlib.crc32(case.id.encode())  # stable whatever subset is chosen
                cases.append(case)
        cases += edge_cases(algo, paths, steps, devices)
        from optparity.harness.schedulers import scheduler_cases  # it imports this module

        scheduled = scheduler_cases(algo, paths, dtypes, steps)
        if devices != ("cpu",):
            scheduled = [c for c in scheduled
                         if _runs(algo, c.path, c.dtype, devices) and not _refused_across(c.config, devices)]
        cases += scheduled
        from optparity.harness import covering  # it imports this module

        covered = covering.covering_cases(algo, paths, steps, full=triples)
        if devices != ("cpu",):
            covered = [c for c in covered
                       if _runs(algo, c.path, c.dtype, devices) and not _refused_across(c.config, devices)]
        cases += covered
    if devices != ("cpu",):  # seeds were taken from the CPU ids above
        for case in cases:
            case.device, case.reference_device = device, (None if len(devices) == 1 else reference_device)
    return cases


# --- Edge axes: the conditions kernels break under, each on a chosen subset (docs/matrix.md
# says which case covers which condition and why). Cheap ones run at the default level,
# expensive ones (huge tensors, long runs, every configuration) only at the full level.
EDGE_AXES = ("low_precision", "sizes", "tensor_count", "layouts", "values", "lengths", "threads",
             "dtype_mix", "amp", "default_dtype", "rollback")
LONG_RUN = 300  # steps of the cheap long run; the full level runs FULL_LONG_RUN
FULL_LONG_RUN = 1000
THREADS = 2  # several intra-op threads (the full level adds 3: chunks not a multiple of a vector)
LOW = (torch.bfloat16, torch.float16)
_F32 = (torch.float32,)


def representative(algo: str) -> list[int]:
    """Config indices for the expensive axes: the defaults and the richest ordinary config (most
    options on; differentiable and capturable ones are their own matter)."""
    cfgs = configs(algo)
    plain = [i for i, c in enumerate(cfgs) if not c.get("differentiable") and not c.get("capturable")]
    richest = max(plain, key=lambda i: (len(cfgs[i]), -i)) if plain else 0
    return sorted({0, richest})


def _edge_plan(algo: str):
    """(axis, cost, config indices, paths, dtypes, param set, steps, extra Case fields) rows."""
    s = spec(algo)
    cfgs = configs(algo)
    rep, every, first = representative(algo), list(range(len(cfgs))), [0]
    kernels = ("forloop", "foreach", "fused")
    base_set = param_sets_for(algo, ("mixed",))[0]
    lowp = LOW if s.low_precision else ()
    plan = [
        ("lengths", "cheap", first, ("forloop",), _F32, base_set, LONG_RUN, {}),
        ("lengths", "expensive", rep, kernels, _F32, base_set, FULL_LONG_RUN, {}),
        ("default_dtype", "cheap", rep, kernels, _F32, base_set, STEPS, {"default_dtype": torch.float64}),
        ("amp", "cheap", rep, kernels, _F32 + lowp[:1], base_set, STEPS, {"amp": True}),
        ("amp", "cheap", first, ("fused",), lowp, base_set, STEPS, {"amp": True}),
        ("amp", "expensive", every, PATHS, _F32 + lowp, base_set, STEPS, {"amp": True}),
        # a state_dict loaded into the optimizer that saved it, steps later (ROLLBACKS)
        ("rollback", "cheap", first, PATHS, _F32, base_set, STEPS, {}),
        ("rollback", "expensive", rep, PATHS, (torch.float64,), base_set, STEPS, {}),
    ]
    if lowp:
        plan += [("low_precision", "cheap", rep, PATHS, lowp, base_set, STEPS, {})]
        # every other configuration in both low-precision dtypes too, each on one path (the paths
        # rotate with the configuration, bfloat16 and float16 one path apart): a config-specific
        # low-precision bug (amsgrad's max in bf16, a weight decay rounded twice) shows at the
        # default level; the full cross is the full level's
        # (not for closure optimizers: a step of theirs is a whole inner optimisation)
        have = [p for p in PATHS if _runs(algo, p, lowp[0])]
        for i in every if s.kind != "closure" else ():
            for k, dtype in enumerate(lowp if i not in rep else ()):
                turn = have[(i + k) % len(have):] + have[:(i + k) % len(have)]
                path = next((p for p in turn if not _upstream_nondeterministic(algo, cfgs[i], p, dtype, base_set)),
                            None)
                if path is not None:
                    plan.append(("low_precision", "cheap", [i], (path,), (dtype,), base_set, STEPS, {}))
    if s.kind == "dense":  # the sets below are of dense tensors of any shape
        plan += [
            ("sizes", "cheap", first, kernels, _F32, "sizes", 6, {}),
            ("sizes", "cheap", first, ("fused",) if s.fused_on_cpu else ("foreach",), lowp[:1], "sizes", 6, {}),
            ("sizes", "expensive", rep, PATHS, _F32 + lowp, "sizes_full", 4, {}),
            ("tensor_count", "cheap", first, ("foreach", "fused"), _F32, "many", 4, {}),
            ("tensor_count", "expensive", rep, PATHS, _F32 + lowp, "many_full", 6, {}),
            ("layouts", "cheap", rep, kernels, _F32, "layouts", STEPS, {}),
            ("layouts", "expensive", every, PATHS, (torch.float64,) + lowp, "layouts", STEPS, {}),
            ("values", "cheap", rep, kernels, _F32, "values", STEPS, {}),
            ("values", "cheap", first, ("forloop",), (torch.float64,) + lowp, "values", STEPS, {}),
            ("values", "expensive", every, PATHS, (torch.float32, torch.float64) + lowp, "values", STEPS, {}),
            ("threads", "cheap", first, kernels, _F32, "sizes", 4, {"threads": THREADS}),
            ("threads", "expensive", rep, PATHS, _F32 + lowp, "sizes_full", 3, {"threads": THREADS + 1}),
            # dtype_mix's own dtype only says whether the low-precision members are included
            ("dtype_mix", "cheap", rep, kernels, _F32 if lowp else (torch.float64,), "dtype_mix", STEPS, {}),
        ]
    return plan


def edge_cases(algo: str, paths=PATHS, steps: int = STEPS, devices=("cpu",)) -> list[Case]:
    """The edge cases of `algo` (on CPU configurations, even on CUDA: `devices` only drops the paths
    and cases a device lacks); build_cases sets their device."""
    out, seen = [], set()
    for axis, cost, indices, axis_paths, dtypes, pset, n, extra in _edge_plan(algo):
        n = n if axis == "lengths" else min(n, steps)
        for index, path, dtype in itertools.product(indices, axis_paths, dtypes):
            config = configs(algo)[index]
            if (path not in paths or not _runs(algo, path, dtype, devices) or _refused_across(config, devices)
                    or _upstream_nondeterministic(algo, config, path, dtype, pset, devices)):
                continue
            case = Case(algo, config, path, dtype, pset, steps=n, config_index=index,
                        second_group=spec(algo).second_group, axis=axis, cost=cost, **extra)
            if case.id in seen:  # an expensive row repeating a cheap one
                continue
            seen.add(case.id)
            case.seed = zlib.crc32(case.id.encode())
            out.append(case)
    return out
