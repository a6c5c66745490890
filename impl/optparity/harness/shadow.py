"""The shadow verdict: is a candidate that differs from torch "rounding-level" or "different math"?

ULP counts alone cannot tell: an honest reordering of a formula drifts by billions of ULPs where a
value nears zero, while an ignored option can stay within a few ULPs in bfloat16. So a differing
case is run again beside a *shadow*: torch's own reference, from the same inputs, in higher
precision. Each side is then judged by its error against the shadow:

  * float32, float16 and bfloat16 tensors: the shadow is the reference run in float64 (inputs
    upcast exactly, the for-loop path). Torch's own error is |reference - shadow|.
  * float64 tensors (nothing wider runs torch's kernels): the shadow is the float64 for-loop run,
    and torch's own error is estimated by precision scaling: the reference is also run in float32
    from the inputs rounded to float32, and |float32 run - float64 run| is scaled by
    eps(float64) / eps(float32) = 2^-29. To first order rounding error is linear in the unit
    roundoff, so this is the error a float64 run makes, conditioning (cancellation, a value near
    zero) included. Torch's error is taken as at least its own distance to the shadow too: with
    a float32 tensor lr its coefficients are rounded in float32 whatever the parameters' dtype,
    which the shadow (its tensor hyperparameters in float64) does not do.

For every compared tensor (each parameter, each floating state tensor both sides hold) and every
step, with e_c = |candidate - shadow| and e_r = torch's error, elementwise over finite values:

    ratio = max_i  e_c[i] / (noise + (pooled + ULPS * eps) * |shadow[i]|)

where noise is the largest e_r of that tensor so far (torch's rounding noise floor: the largest
error it made on any element of the tensor, at this step or before), pooled the largest
noise / max|shadow| of the same quantity (parameters, or one state key) over all tensors so far
(a 0-dim tensor's own error is a single draw), and the ULPS term allows a final rounding where
torch happens to be exact. The case is rounding-level when the ratio stays
at or below FACTOR everywhere, different math otherwise (and whenever a NaN or infinity appears on
one side only). When the reference is the suspect (a case matrix.reference_suspect names), torch's
for-loop path stands in for the reference's error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

FACTOR = 4.0  # rounding-level: at most this many times torch's own error against the shadow
ULPS = 2.0  # plus this many units of roundoff of each value (a last rounding where torch is exact)
_SCALED_FROM = torch.float32  # the proxy precision of float64 tensors

_HIGH = {torch.float16: torch.float64, torch.bfloat16: torch.float64, torch.float32: torch.float64,
         torch.complex64: torch.complex128}
_LOW = {torch.float64: torch.float32, torch.complex128: torch.complex64}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def cast_keep_layout(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` as `dtype` with the same sizes, strides and storage offset (a gapped view stays gapped:
    the fused kernels' known fault on such views is part of what is checked)."""
    if t.dtype == dtype:
        return t
    if t.is_sparse:
        return t.to(dtype)
    storage = t.untyped_storage()
    whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
    return whole.to(dtype).as_strided(t.size(), t.stride(), t.storage_offset())


def cast_pset(pset, mapping: dict):
    """A copy-free conversion of a freshly built ParamSet: every tensor of a dtype in `mapping`
    becomes that dtype, layout kept; differentiable parameters are again non-leaf clones."""
    leaves, params = [], []
    for leaf, param in zip(pset.leaves, pset.params):
        target = mapping.get(leaf.dtype, leaf.dtype)
        new_leaf = cast_keep_layout(leaf.detach(), target).requires_grad_(leaf.requires_grad)
        if param is not leaf:
            new_param = new_leaf.clone(memory_format=torch.preserve_format)
            new_param.retain_grad()
        else:
            new_param = new_leaf
        leaves.append(new_leaf)
        params.append(new_param)
    pset.leaves, pset.params = leaves, params
    return pset


def cast_grads(grads, mapping: dict):
    """Private copies (a gradient of the target dtype too: the reference's zero_grad must not reach it)."""
    return [None if g is None else g.to(mapping.get(g.dtype, g.dtype), copy=True) for g in grads]


def cast_config(config: dict, mapping: dict) -> dict:
    """Tensor hyperparameters (a tensor lr, tensor betas) in the shadow's precision, same values."""
    def cast(v):
        if isinstance(v, Tensor) and v.dtype in mapping:
            return v.to(mapping[v.dtype])
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in config.items()}


def _f64(t: Tensor) -> Tensor:
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    t = t.cpu()
    if t.is_complex():
        t = torch.view_as_real(t.to(torch.complex128))
    return t.to(torch.float64)


def _comparable(*ts) -> bool:
    return all(isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) for t in ts) and len(
        {tuple(t.shape) for t in ts}) == 1


@dataclass
class ShadowVerdict:
    """What the shadow says about one case."""

    math: str  # runner.ROUNDING or runner.DIFFERENT_MATH
    ratio: float  # candidate's error / torch's (see the module docstring); FACTOR is the bound
    basis: str  # how torch's own error was obtained
    step: int | None = None  # where the ratio is largest
    where: str | None = None  # "param NAME" or "state NAME['key']"
    candidate_error: float = 0.0  # |candidate - shadow| there
    reference_error: float = 0.0  # torch's noise floor on that tensor there
    per_step: list = field(default_factory=list)  # the largest ratio at each step
    note: str = ""  # e.g. NaN/inf, or what stood in for the reference

    def as_dict(self) -> dict:
        return {"math": self.math, "ratio": _finite(self.ratio), "factor": FACTOR, "ulps": ULPS,
                "basis": self.basis, "step": self.step, "where": self.where,
                "candidate_error": self.candidate_error, "reference_error": self.reference_error,
                "per_step": [_finite(r) for r in self.per_step], "note": self.note or None}

    def describe(self) -> str:
        ratio = "inf" if math.isinf(self.ratio) else f"{self.ratio:.3g}"
        text = (f"{ratio}x torch's own error against the {self.basis} (rounding-level up to {FACTOR:g}x)")
        if self.where and self.candidate_error:
            text += (f"; worst at step {self.step}, {self.where}: |cand - shadow| {self.candidate_error:.3g} vs "
                     f"torch's {self.reference_error:.3g}")
        return text + (f"; {self.note}" if self.note else "")


def _finite(x: float):
    return x if math.isfinite(x) else "inf"


class Shadow:
    """Drivers that step beside a case's candidate and reference: `high` (the reference in float64)
    and, when a tensor is float64 already, `low` (the reference in float32, for precision scaling).
    measure() after every step accumulates the ratio of the module docstring."""

    def __init__(self, make_driver, make_pset, config: dict, has_float64: bool):
        # make_driver(pset, hyper) builds the reference over a pset; make_pset() a fresh case pset
        self.high = make_driver(cast_pset(make_pset(), _HIGH), cast_config(config, _HIGH))
        self.low = (make_driver(cast_pset(make_pset(), _LOW), cast_config(config, _LOW))
                    if has_float64 else None)
        self.noise: dict = {}  # (param index, state key or None) -> torch's largest error so far
        self.relative: dict = {}  # state key or None -> torch's largest error relative to the tensor's scale
        self.ratio, self.worst = 0.0, None
        self.per_step: list[float] = []
        self.failed = ""  # why the shadow stopped, if it did

    @property
    def drivers(self):
        return [d for d in (self.high, self.low) if d is not None]

    def private_grads(self, grads) -> list:
        """Each shadow driver's own copies of a step's gradients, in its precision (drivers' order)."""
        return [cast_grads(grads, _HIGH if driver is self.high else _LOW) for driver in self.drivers]

    def measure(self, step: int, cand, ref, names: list[str]) -> None:
        """Errors of `cand` and of `ref` (torch, or what stands in for it) against the shadow."""
        best = 0.0
        for i, name in enumerate(names):
            best = max(best, self._tensor(step, (i, None), f"param {name}", cand.pset.params[i],
                                          ref.pset.params[i], self.high.pset.params[i],
                                          self.low.pset.params[i] if self.low else None))
        sc, sr, sh = cand.state(), ref.state(), self.high.state()
        sl = self.low.state() if self.low else {}
        for i in sorted(set(sc) & set(sr) & set(sh)):
            for key in sorted(set(sc[i]) & set(sr[i]) & set(sh[i])):
                c, r, h = sc[i][key], sr[i][key], sh[i][key]
                low = sl.get(i, {}).get(key) if self.low else None
                if not _comparable(c, r, h):
                    continue
                best = max(best, self._tensor(step, (i, key), f"state {names[i]}[{key!r}]", c, r, h, low))
        self.per_step.append(best)

    def _tensor(self, step, slot, where, c: Tensor, r: Tensor, h: Tensor, low: Tensor | None) -> float:
        if not _comparable(c, r, h) or (low is not None and not _comparable(low, r)):
            return 0.0
        dtype = _real_dtype(r.dtype)
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        c64, r64, h64 = _f64(c), _f64(r), _f64(h)
        finite = torch.isfinite(c64) & torch.isfinite(r64) & torch.isfinite(h64)
        if r.dtype in _LOW:  # float64: torch's error by precision scaling
            if low is None:
                return 0.0
            l64 = _f64(low)
            ok = finite & torch.isfinite(l64)
            scale = eps / torch.finfo(_real_dtype(low.dtype)).eps
            # and at least its distance to the shadow: a float32 tensor lr rounds torch's
            # coefficients in float32 whatever the parameters' dtype
            e_r = torch.where(ok, torch.maximum((l64 - h64).abs() * scale, (r64 - h64).abs()),
                              torch.where(finite, (r64 - h64).abs(), torch.zeros_like(h64)))
        else:
            e_r = torch.where(finite, (r64 - h64).abs(), torch.zeros_like(h64))
        if not bool(finite.any()):
            return 0.0
        noise = max(self.noise.get(slot, 0.0), float(e_r.max()))
        self.noise[slot] = noise
        # torch's relative error on the same quantity in the other tensors (a 0-dim parameter's
        # own error is one draw, the pool of all parameters' a distribution)
        scale = float(torch.where(finite, h64.abs(), torch.zeros_like(h64)).max())
        pooled = max(self.relative.get(slot[1], 0.0), noise / max(scale, tiny))
        self.relative[slot[1]] = pooled
        e_c = torch.where(finite, (c64 - h64).abs(), torch.zeros_like(h64))
        floor = noise + (pooled + ULPS * eps) * h64.abs().clamp_min(tiny)
        ratios = e_c / floor
        k = int(ratios.argmax()) if ratios.numel() else 0
        worst = float(ratios.reshape(-1)[k]) if ratios.numel() else 0.0
        if worst > self.ratio:
            self.ratio = worst
            self.worst = (step, where, float(e_c.reshape(-1)[k]), noise)
        return worst

    def verdict(self, nan_inf: bool, rounding: str, different: str, basis_note: str = "") -> ShadowVerdict:
        basis = "float64 shadow" if self.low is None else "float64 shadow (float64 tensors: scaled float32 error)"
        step, where, e_c, noise = self.worst or (None, None, 0.0, 0.0)
        math_ = different if nan_inf or self.ratio > FACTOR else rounding
        note = "NaN/inf on one side only" if nan_inf else ""
        note = "; ".join(n for n in (note, basis_note) if n)
        return ShadowVerdict(math_, self.ratio, basis, step, where, e_c, noise, list(self.per_step), note)


# --- When the reference is the suspect -----------------------------------------------------------

def _dense(t: Tensor) -> bool:
    """Every storage element between the first and the last is the tensor's (no gaps, no overlap)."""
    if t.is_sparse or t.numel() == 0:
        return True
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1)
    return span == t.numel()


def suspect_note(case, reference_label: str, params) -> str:
    """Why torch's own result is not to be trusted on this case ("" when it is): its fused CPU
    kernel on a non-dense parameter, a case matrix._upstream_nondeterministic names, or a case
    where torch.distributed.optim's functional class is recorded differing from torch.optim
    (reference/upstream_functional_vs_torch_optim.json). The docs' "What the harness found
    upstream" says more of each."""
    from optparity.harness import matrix

    on_cpu = matrix.device_type(getattr(case, "reference_device", None) or getattr(case, "device", "cpu")) == "cpu"
    notes = []
    if case.path == "fused" and on_cpu and any(p.requires_grad and not _dense(p) for p in params):
        notes.append("torch's fused CPU kernel updates a non-dense parameter (a gapped view) as if it were dense")
    if matrix._upstream_nondeterministic(case.algorithm, case.config, case.path, case.dtype, case.param_set,
                                         (getattr(case, "device", "cpu"),)):
        notes.append("torch's fused CPU SGD with momentum is not deterministic in float16/bfloat16")
    recorded = _upstream_record().get(case.algorithm, {})
    if reference_label.startswith("torch.distributed.optim.functional_") and case.id in recorded:
        notes.append(f"torch.distributed.optim's functional {case.algorithm} differs from torch.optim here "
                     f"({recorded[case.id][:160]})")
    return "; ".join(notes)


_RECORD: dict | None = None


def _upstream_record() -> dict:
    global _RECORD
    if _RECORD is None:
        import json
        from pathlib import Path

        path = Path(__file__).resolve().parents[3] / "reference" / "upstream_functional_vs_torch_optim.json"
        try:
            _RECORD = json.loads(path.read_text())
        except (OSError, ValueError):
            _RECORD = {}
    return _RECORD


def option_effect(case, reference, change: dict, steps: int | None = None) -> float:
    """How far the reference's float64 shadow moves when `change` is applied to its
    hyperparameters (e.g. {"amsgrad": False}), in the units of the verdict's ratio: torch's own
    error on `case`. Above FACTOR the option changes the result beyond rounding, so a candidate
    ignoring it can be told apart. Runs the case's steps up to the cross-load (after it the
    candidate carries the reference's state), each side as the runner steps it."""
    from optparity.harness import conditions, runner
    from optparity.harness.candidates import make_driver
    from optparity.harness.matrix import CROSS_LOAD, LR_CHANGE, RELOAD_OWN
    from optparity.harness.params import make_grads

    subject = reference if isinstance(reference, runner.Subject) else runner.Subject.of(reference)
    algo = case.algorithm
    hyper = {**case.config, **case.path_kwargs()}
    shadow_hyper = {**case.config, "foreach": False} if "foreach" in runner._signature(subject) else dict(case.config)

    def build(pset, h):
        return make_driver(subject.obj, subject.kind, algo, pset, h)

    with conditions.applied(case):
        ref = build(runner._new_pset(case), hyper)
        probe = runner._new_pset(case)
        wide = any(p.dtype in _LOW for p in probe.params)
        shadow = Shadow(build, lambda: runner._new_pset(case), shadow_hyper, wide)
        alt = build(cast_pset(runner._new_pset(case), _HIGH), cast_config({**shadow_hyper, **change}, _HIGH))
        drivers = [ref, *shadow.drivers, alt]
        for step in range(1, min(steps or case.steps, CROSS_LOAD - 1) + 1):
            grads = make_grads(ref.pset, case.seed, step)
            own = [grads, *shadow.private_grads(grads), cast_grads(grads, _HIGH)]
            for driver, g in zip(drivers, own):
                conditions.step(case, driver, g, step)
            shadow.measure(step, alt, ref, ref.pset.names)
            if step == RELOAD_OWN and getattr(ref, "supports_state_dict", False) and not case.config.get("differentiable"):
                for driver in drivers:
                    driver.reload(driver.state_dict())
            if step == LR_CHANGE and getattr(ref, "supports_param_groups", False):
                for driver in drivers:
                    driver.scale_lr(0.5)
    return shadow.ratio
