"""The AMP recipes of torch's documentation and popular trainers (issue 17), as a case field
(matrix.Case.amp_recipe) the covering design sets; the plain GradScaler recipe (Case.amp alone)
stays in conditions.py.

  unscale_clip    scaler.scale(loss).backward(); scaler.unscale_(opt); clip_grad_norm_(params,
                  CLIP_NORM); scaler.step(opt); scaler.update() — fused optimizers then get
                  found_inf with grad_scale None (torch/amp/grad_scaler.py);
  two_optimizers  one scaler over two optimizers (the parameters split between them): the first
                  unscaled and clipped, the second not, each stepped, one update; the injected
                  infinity is in the first's gradients only, so one skips and the other steps;
  bf16_autocast   no scaler: gradients rounded through bfloat16 (what backward through bfloat16
                  activations gives float32 parameters) and the step taken inside
                  torch.autocast("cpu", bfloat16), as trainers that step inside the block do.

Every scaler recipe injects an infinity at conditions.AMP_INF_STEPS: a step GradScaler skips.
Beyond comparing the two sides, a skipped step is checked on its own: the candidate's
parameters and state must be exactly what they were before scaler.step (check_skipped).
"""
from __future__ import annotations

import torch

from optparity.harness.bitwise import compare
from optparity.harness.candidates import NotApplicable, private_copy

RECIPES = ("unscale_clip", "two_optimizers", "bf16_autocast")
SCALED = ("unscale_clip", "two_optimizers")  # the recipes driven by a GradScaler
CLIP_NORM = 1.0  # below the gradients' norms: clipping changes them at every step


def recipe_of(case) -> str | None:
    return getattr(case, "amp_recipe", None)


def attach(case, *drivers) -> None:
    """two_optimizers: split each torch.optim-style driver's parameters between its optimizer and a
    second one of the same class and options (the second group's overrides when there are two
    groups); state() then answers for both, reload and lr changes reach both."""
    if recipe_of(case) != "two_optimizers":
        return
    for driver in drivers:
        if driver is not None and getattr(driver, "opt", None) is not None:
            _split(driver)


def _split(driver) -> None:
    groups = driver.pset.groups
    if len(groups) > 1:
        first, (second, over) = [groups[0]], groups[1]
    else:
        everything = groups[0][0]
        half = len(everything) // 2
        first, second, over = [(everything[:half], groups[0][1])], everything[half:], dict(groups[0][1])
    driver.pset.groups, driver.pset.add_later = first, False
    driver.opt = driver._build()
    build_second = lambda: driver.cls([{"params": [driver.pset.params[i] for i in second], **over}],  # noqa: E731
                                      **private_copy(driver.hyper))
    driver._optparity_second = build_second()
    own_state, own_reload, own_scale = driver.state, driver.reload, driver.scale_lr

    def state():
        out = own_state()
        opt = driver._optparity_second
        out.update({i: opt.state[driver.pset.params[i]] for i in second if driver.pset.params[i] in opt.state})
        return out

    def reload(state_dict):
        own_reload(state_dict)
        saved = driver._optparity_second.state_dict()
        driver._optparity_second = build_second()
        driver._optparity_second.load_state_dict(saved)

    def scale_lr(factor):
        own_scale(factor)
        for group in driver._optparity_second.param_groups:
            group["lr"] = group["lr"] * factor

    driver.state, driver.reload, driver.scale_lr = state, reload, scale_lr


def step(case, driver, grads, n: int):
    """One step of `driver` under the case's recipe; returns what the (first) step returned."""
    from optparity.harness import conditions

    recipe = recipe_of(case)
    if recipe == "bf16_autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return driver.step([_through_bf16(g) for g in grads], n)
    opt = getattr(driver, "opt", None)
    if opt is None or getattr(driver, "closure_objective", None) is not None:
        raise NotApplicable("GradScaler drives torch.optim-style optimizers stepped without a closure")
    scaler = conditions.scaler_of(driver)
    poisoned = conditions.poisoned(grads, n)
    for p, g in zip(driver.pset.params, poisoned):
        p.grad = None if g is None else conditions.scaled(scaler, g)
    opts = [opt] + ([driver._optparity_second] if recipe == "two_optimizers" else [])
    scaler.unscale_(opt)  # the first optimizer only: the second is stepped still scaled
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], CLIP_NORM)
    out, driver._optparity_skips = None, []
    for k, o in enumerate(opts):
        before = _snapshot(o)
        got = scaler.step(o)
        out = got if k == 0 else out
        if sum(v.item() for v in scaler._found_inf_per_device(o).values()):  # torch's own record
            driver._optparity_skips.append((o, before))
    scaler.update()
    return out


def _through_bf16(g):
    if g is None or not g.is_floating_point():
        return g
    if g.is_sparse:
        return torch.sparse_coo_tensor(g._indices(), g._values().to(torch.bfloat16).to(g.dtype), g.shape,
                                       is_coalesced=g.is_coalesced(), check_invariants=True)
    return g.to(torch.bfloat16).to(g.dtype)  # preserve_format: the strides stay


def _snapshot(opt) -> dict:
    return {"params": [p.detach().clone() for g in opt.param_groups for p in g["params"]],
            "state": private_copy({id(p): dict(opt.state[p]) for g in opt.param_groups for p in g["params"]
                                   if p in opt.state})}


def check_skipped(tracker, step: int, driver, names: list[str]) -> None:
    """Record, for each optimizer of the candidate whose step GradScaler skipped (found_inf), any
    parameter or state tensor that is not bit for bit what it was before scaler.step."""
    index = {id(p): i for i, p in enumerate(driver.pset.params)}
    for opt, before in getattr(driver, "_optparity_skips", ()):
        params = [p for g in opt.param_groups for p in g["params"]]
        for p, old in zip(params, before["params"]):
            diff = compare(p.detach(), old)
            if diff is not None:
                tracker.record(step, "param", names[index[id(p)]], "skipped step", diff,
                               f"GradScaler skipped this step (found_inf) but the parameter changed: {diff.describe()}")
        for p in params:
            old = before["state"].get(id(p), {})
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and isinstance(old.get(key), torch.Tensor):
                    diff = compare(value, old[key])
                    if diff is not None:
                        tracker.record(step, "state", names[index[id(p)]], key, diff,
                                       f"GradScaler skipped this step (found_inf) but state[{key!r}] changed: "
                                       f"{diff.describe()}")
    driver._optparity_skips = []
