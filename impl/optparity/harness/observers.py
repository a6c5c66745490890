"""What a case compares besides parameters and state (issue 8, section 2), for torch.optim-style
drivers on both sides:

  * the caller's .grad tensors after every step: a candidate may change them only where the
    reference does, identically (bits, layout, None-ness);
  * zero_grad in both set_to_none modes (after steps ZERO_GRAD), and whether the grad tensor
    object survives it;
  * the calls of the step / state_dict / load_state_dict pre- and post-hooks torch.optim's base
    class fires, in order, with what they receive;
  * that load_state_dict leaves the dict it is given as it was.

The runner makes one Observer per case once both drivers exist and calls after_step(n) after
comparing a step; differences go to the case's tracker (record(step, where, param, key, diff,
message))."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from optparity.harness.bitwise import compare
from optparity.harness.candidates import private_copy

# After these steps both sides' zero_grad(set_to_none=...) runs; the next step sets fresh grads.
ZERO_GRAD = {3: False, 5: True}
HOOKS = ("register_step_pre_hook", "register_step_post_hook", "register_state_dict_pre_hook",
         "register_state_dict_post_hook", "register_load_state_dict_pre_hook",
         "register_load_state_dict_post_hook")


def compare_grads(a: Tensor | None, b: Tensor | None):
    """(Difference or None, message) between two .grad values (dense or sparse, or None)."""
    if a is None or b is None:
        if (a is None) != (b is None):
            return None, f"candidate's .grad is {'None' if a is None else 'a tensor'}, reference's " \
                         f"{'None' if b is None else 'a tensor'}"
        return None, ""
    if a.layout != b.layout:
        return None, f".grad layout differs: candidate {a.layout}, reference {b.layout}"
    if a.is_sparse:
        if a.is_coalesced() != b.is_coalesced():
            return None, f".grad coalesced: candidate {a.is_coalesced()}, reference {b.is_coalesced()}"
        d = compare(a._indices(), b._indices())
        return (d, "") if d is not None else (compare(a._values(), b._values()), "")
    if a.stride() != b.stride():
        return None, f".grad strides differ: candidate {a.stride()}, reference {b.stride()}"
    return compare(a, b), ""


def changes(given: Any, before: Any, path: str = "state_dict") -> str | None:
    """Where `given` no longer equals its earlier deep copy `before`, or None."""
    if isinstance(before, Tensor):
        if not isinstance(given, Tensor):
            return f"{path} was a tensor, is now {type(given).__name__}"
        d = compare(given, before)
        return None if d is None else f"{path}: {d.describe()}"
    if type(given) is not type(before):
        return f"{path} was {type(before).__name__}, is now {type(given).__name__}"
    if isinstance(before, dict):
        if list(given) != list(before):
            return f"{path} keys were {list(before)!r}, are now {list(given)!r}"
        return next((c for k in before if (c := changes(given[k], before[k], f"{path}[{k!r}]"))), None)
    if isinstance(before, (list, tuple)):
        if len(given) != len(before):
            return f"{path} had {len(before)} entries, now {len(given)}"
        return next((c for i, (g, b) in enumerate(zip(given, before)) if (c := changes(g, b, f"{path}[{i}]"))), None)
    if isinstance(before, float) and before != before and given != given:
        return None  # NaN stays NaN (LBFGS's prev_loss in float16)
    return None if given == before else f"{path} was {before!r}, is now {given!r}"


class Observer:
    def __init__(self, tracker, cand, ref, names: list[str]):
        self.tracker, self.names, self.step = tracker, names, 0
        self.drivers = {"candidate": cand, "reference": ref}
        self.logs: dict[str, list] = {"candidate": [], "reference": []}
        self.hookable: dict[str, str | None] = {}  # side -> the hook method it lacks, if any
        self.active = all(getattr(d, "opt", None) is not None for d in (cand, ref))
        if self.active:
            for side, driver in self.drivers.items():
                self._attach(side, driver)

    # --- wiring: hooks on every optimizer a driver builds, a check around every reload
    def _attach(self, side: str, driver) -> None:
        self._hook(side, driver.opt)
        build, reload = driver._build, driver.reload

        def hooked_build():
            opt = build()
            self._hook(side, opt)
            return opt

        def checked_reload(state_dict):
            before = private_copy(state_dict)
            reload(state_dict)
            changed = changes(state_dict, before)
            if changed:
                self.tracker.record(self.step, "state_dict", None, "load_state_dict", None,
                                    f"the {side}'s load_state_dict changed the dict it was given: {changed}")

        driver._build, driver.reload = hooked_build, checked_reload

    def _hook(self, side: str, opt) -> None:
        missing = next((h for h in HOOKS if not callable(getattr(opt, h, None))), None)
        self.hookable[side] = missing
        if missing:
            return
        log = self.logs[side]

        def closure_of(args, kwargs) -> bool:
            return any(callable(a) for a in args[1:]) or callable(kwargs.get("closure"))

        opt.register_step_pre_hook(lambda o, args, kwargs: log.append(
            ("step pre-hook", o is opt, args[:1] == (opt,), closure_of(args, kwargs))))
        opt.register_step_post_hook(lambda o, args, kwargs: log.append(
            ("step post-hook", o is opt, args[:1] == (opt,), closure_of(args, kwargs))))
        opt.register_state_dict_pre_hook(lambda o: log.append(("state_dict pre-hook", o is opt)))
        opt.register_state_dict_post_hook(lambda o, sd: log.append(
            ("state_dict post-hook", o is opt, sorted(sd), len(sd.get("state", ())), len(sd.get("param_groups", ())))))
        opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(
            ("load_state_dict pre-hook", o is opt, sorted(sd))))
        opt.register_load_state_dict_post_hook(lambda o: log.append(("load_state_dict post-hook", o is opt)))

    # --- comparisons
    def after_step(self, step: int) -> None:
        if not self.active:
            return
        self.step = step
        self._compare_hooks(step)
        self._compare_grads(step, ".grad")
        if step in ZERO_GRAD:
            self._zero_grad(step, ZERO_GRAD[step])

    def _compare_hooks(self, step: int) -> None:
        if self.hookable["reference"] is None and self.hookable["candidate"] is not None:
            self.tracker.record(step, "hooks", None, None, None,
                                f"the candidate has no {self.hookable['candidate']}(): torch.optim's hooks cannot run")
            self.hookable["candidate"] = None  # said once
        got, want = _collapsed(self.logs["candidate"]), _collapsed(self.logs["reference"])
        if got != want:
            at = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            self.tracker.record(step, "hooks", None, None, None,
                                f"hook call {at + 1} differs: candidate {got[at] if at < len(got) else 'none'}, "
                                f"reference {want[at] if at < len(want) else 'none'} "
                                f"({len(got)} vs {len(want)} calls since the last step)")
        self.logs["candidate"].clear()
        self.logs["reference"].clear()

    def _params(self):
        return zip(self.names, self.drivers["candidate"].pset.params, self.drivers["reference"].pset.params)

    def _compare_grads(self, step: int, key: str) -> None:
        for name, pc, pr in self._params():
            diff, message = compare_grads(pc.grad, pr.grad)
            if diff is not None or message:
                self.tracker.record(step, "grad", name, key, diff, message)

    def _zero_grad(self, step: int, set_to_none: bool) -> None:
        before = {side: [p.grad for p in d.pset.params] for side, d in self.drivers.items()}
        errors = {}
        for side, d in self.drivers.items():
            try:
                d.opt.zero_grad(set_to_none=set_to_none)
                errors[side] = None
            except Exception as e:  # noqa: BLE001 - compared with the other side's
                errors[side] = f"{type(e).__name__}: {e}"
        key = f"zero_grad(set_to_none={set_to_none})"
        if errors["candidate"] != errors["reference"]:
            self.tracker.record(step, "grad", None, key, None,
                                f"candidate: {errors['candidate'] or 'no error'} | reference: {errors['reference'] or 'no error'}")
            return
        self._compare_grads(step, key)
        for i, (name, pc, pr) in enumerate(self._params()):
            kept_c, kept_r = pc.grad is before["candidate"][i], pr.grad is before["reference"][i]
            if pc.grad is not None and pr.grad is not None and kept_c != kept_r:
                self.tracker.record(step, "grad", name, key, None,
                                    f"{key} {'kept' if kept_c else 'replaced'} the .grad tensor object, "
                                    f"the reference {'kept' if kept_r else 'replaced'} it")


def _collapsed(log: list) -> list:
    """A subclass whose step() calls super().step() runs torch's step wrapper twice: the same
    pre-hook call twice in a row (and the post-hook). Count such a nested pair once."""
    out = []
    for entry in log:
        if not (out and entry == out[-1] and entry[0].startswith("step")):
            out.append(entry)
    return out
