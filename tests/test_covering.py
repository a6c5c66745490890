"""Issue 17: interactions by construction, degenerate shapes and the AMP recipes.

* every pair of compatible conditions (harness/covering.py's factors, from the algorithm
  descriptions, less the documented constraints) meets in a default-level case, read back from
  the cases themselves;
* the design is deterministic, its impossible pairs are each named by a constraint with a reason;
* the degenerate set puts zero-element tensors first, in the middle and last of the group and of
  each dtype group; the AMP recipes do what they say (one optimizer skips, the other steps);
* each interaction mutant is silent where only some of its conditions hold.
"""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optparity.harness import amp, check, covering, levels, params
from optparity.harness.algorithms import ALGORITHMS, spec
from optparity.harness.candidates import OptimizerDriver
from optparity.harness.conditions import AMP_INF_STEPS
from optparity.harness.mutants import EDGE_MUTANTS, by_name


def _default_rows(algo: str) -> list[dict]:
    return [r for r in map(covering.row_of, levels.select("default", algo)) if r is not None]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_compatible_pair_meets_in_a_default_case(algo):
    domains = covering.factors(algo)
    wanted = covering.compatible_tuples(algo, 2)
    met = set()
    for row in _default_rows(algo):
        met |= {tuple(sorted(((f, row[f]), (g, row[g])), key=lambda fv: covering._key(fv[0])))
                for f, g in itertools.combinations(domains, 2)}
    wanted = {tuple(sorted(t, key=lambda fv: covering._key(fv[0]))) for t in wanted}
    missing = sorted(map(repr, wanted - met))
    assert not missing, f"{len(missing)} compatible pairs never meet, e.g. {missing[:5]}"


def test_constraints_have_reasons_and_bite():
    assert len({c.name for c in covering.CONSTRAINTS}) == len(covering.CONSTRAINTS)
    for c in covering.CONSTRAINTS:
        assert len(c.why) > 40, c.name
    named = set()
    for a in ("SGD", "Adagrad", "Adam", "LBFGS", "SparseAdam", "Adafactor"):
        domains = covering.factors(a)
        for f, g in itertools.combinations(domains, 2):
            for v, w in itertools.product(domains[f], domains[g]):
                for cfg in domains["config"]:
                    bad = covering.violated(a, {f: v, g: w, "config": cfg, "path": domains["path"][0]}
                                            if "path" not in (f, g) else {f: v, g: w, "config": cfg})
                    if bad is not None:
                        named.add(bad.name)
    assert named >= {"sparse gradients x fused", "complex x float16/bfloat16", "float16 x GradScaler.unscale_",
                     "two optimizers x added_group", "GradScaler x closure-only optimizer", "complex x GradScaler"}


def test_every_constraint_is_in_the_docs_table():
    """docs/interactions.md lists the impossible pairs: one row per constraint, by its name."""
    doc = (Path(__file__).parents[1] / "docs" / "interactions.md").read_text()
    rows = {line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ")}
    missing = [c.name for c in covering.CONSTRAINTS if c.name not in rows]
    assert not missing, f"constraints without a row in docs/interactions.md: {missing}"


def test_building_the_design_leaves_forked_workers_usable():
    """The design asks torch (torch_refuses) in the process that then forks the check's workers;
    sparse gradients there must not start OpenMP's pool, or every later check runs in one process.
    A fresh interpreter: this test process may have run parallel regions already."""
    code = ("import importlib, torch\n"
            "from optparity.harness import covering\n"
            "covering.factors('Adagrad'); covering.torch_refuses('SGD', 0, 'forloop', sparse=True)\n"
            "print(importlib.import_module('optparity.harness.check')._forked_openmp_works(30.0))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]


def test_design_is_deterministic_and_small():
    for algo in ("Adam", "SGD"):
        first = covering.design(algo, 2)
        covering.design.cache_clear()
        assert covering.design(algo, 2) == first
        ids = [c.id for c in covering.covering_cases(algo, ("forloop", "foreach", "fused", "default"), full=False)]
        assert len(ids) == len(set(ids)) == len(first)
        # pairwise: about the product of the two largest domains, not the product of all
        sizes = sorted(map(len, covering.factors(algo).values()))
        assert len(first) <= 2 * sizes[-1] * sizes[-2]


def test_covering_cases_round_trip():
    for case in covering.covering_cases("Adagrad", ("forloop", "foreach", "fused", "default"), full=False):
        row = covering.row_of(case)
        assert covering.violated("Adagrad", row) is None, case.id
        assert covering.case_of("Adagrad", row).id == case.id


def test_degenerate_set_places_empties_first_middle_last():
    pset = params.make_params(params.composed_name("degenerate", "dtype_mix", "dense", "one"),
                              torch.float32, 7, {}, False)
    by_dtype = {}
    for p in pset.params:
        by_dtype.setdefault(p.dtype, []).append(p)
    assert len(by_dtype) == 2
    for members in [pset.params] + list(by_dtype.values()):
        empty = [i for i, p in enumerate(members) if p.numel() == 0]
        assert empty[0] == 0 and empty[-1] == len(members) - 1
        assert any(0 < i < len(members) - 1 for i in empty)
    shapes = {tuple(p.shape) for p in pset.params}
    assert {(), (1,), (1, 1), (1, 4096), (4096, 1)} <= shapes
    grads = pset.grad_maker(7, 1)
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(grads, pset.params))


def test_composed_sparse_and_dtype_mix_meet_in_one_group():
    pset = params.make_params(params.composed_name("plain", "dtype_mix", "sparse", "one"), torch.float32, 3, {}, False)
    grads = pset.grad_maker(3, 1)
    sparse_dtypes = {p.dtype for p, g in zip(pset.params, grads) if g is not None and g.is_sparse}
    assert len({p.dtype for p in pset.params}) == 2 and sparse_dtypes and len(pset.groups) == 1


def test_two_optimizers_one_skips_the_other_steps():
    """The infinity is in the first optimizer's gradients only: it skips, the second steps."""
    case = covering.case_of("Adam", {"path": "forloop", "dtype": torch.float32, "shapes": "plain",
                                     "elements": "uniform", "grads": "dense", "groups": "one",
                                     "amp": "two_optimizers", "threads": 1, "scheduler": "none",
                                     "reload": "standard", "config": 0})
    pset = params.make_params(case.param_set, case.dtype, case.seed, {}, False)
    driver = OptimizerDriver(torch.optim.Adam, pset, {"foreach": False})
    amp.attach(case, driver)
    first, second = driver.opt, driver._optparity_second
    n = AMP_INF_STEPS[0]
    for step in range(1, n):
        amp.step(case, driver, params.make_grads(pset, case.seed, step), step)
    before = [p.detach().clone() for p in pset.params]
    amp.step(case, driver, params.make_grads(pset, case.seed, n), n)
    [(skipped, _)] = driver._optparity_skips
    assert skipped is first
    mine = {id(p) for g in first.param_groups for p in g["params"]}
    for p, old in zip(pset.params, before):
        if p.requires_grad and p.grad is not None:
            assert torch.equal(p, old) == (id(p) in mine), "only the first optimizer's step is skipped"
    assert second.state and len(driver.state()) > len(first.state)


def test_skipped_step_check_reports_a_changed_state():
    class Tracker:
        def __init__(self):
            self.records = []

        def record(self, *args):
            self.records.append(args)

    p = torch.ones(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    driver = type("D", (), {})()
    driver.pset = type("P", (), {"params": [p]})()
    driver._optparity_skips = [(opt, amp._snapshot(opt))]
    opt.state[p]["momentum_buffer"].add_(1.0)  # a "skipped" step that touched the state
    tracker = Tracker()
    amp.check_skipped(tracker, 4, driver, ["p"])
    assert tracker.records and tracker.records[0][1] == "state" and "skipped" in tracker.records[0][5]
    assert driver._optparity_skips == []


def test_a_fused_step_through_found_inf_is_reported_as_the_skipped_step():
    """unscale_ then clip_grad_norm_: the injected infinity becomes NaN; GradScaler hands the fused
    kernel found_inf (grad_scale None). A candidate that steps anyway is caught by the skipped-step
    check, at that step, before the comparison with torch."""
    row = {"path": "fused", "dtype": torch.float32, "shapes": "plain", "elements": "uniform", "grads": "dense",
           "groups": "one", "amp": "unscale_clip", "threads": 1, "scheduler": "none", "reload": "standard",
           "config": 0}
    case = covering.case_of("Adam", row)
    assert check("torch.optim:Adam", "torch.optim:Adam", algorithm="Adam", cases=[case]).ok
    mutant = by_name("cover_adam_fused_found_inf_after_unscale")
    first = check(mutant.build(), "torch.optim:Adam", algorithm="Adam", cases=[case]).first_failure
    assert first is not None and first.divergence.step == AMP_INF_STEPS[0]
    assert "GradScaler skipped this step (found_inf)" in first.message, first.message


INTERACTIONS = [m for m in EDGE_MUTANTS if m.kind == "interaction"]


@pytest.mark.parametrize("mutant", INTERACTIONS, ids=lambda m: m.name)
def test_interaction_mutant_needs_every_condition(mutant):
    """Silent in the default level's covering cases that hold some of its conditions but not all;
    caught where all hold (tests/test_mutants.py checks the catch at the suite's level)."""
    cases = [c for c in levels.select("default", mutant.algorithm) if c.axis == "covering"]
    partial = [c for c in cases if any(p(c) for p in mutant.parts) and not mutant.exposed(c)]
    for part in mutant.parts:  # each condition alone is there
        assert any(part(c) for c in partial), mutant.name
    report = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm, cases=partial)
    assert report.ok, f"{report.first_failure.case.id}: {report.first_failure.message}"
    both = [c for c in cases if mutant.exposed(c)]
    assert both, f"no default-level case holds all of {mutant.shows_under}"
    caught = check(mutant.build(), f"torch.optim:{mutant.algorithm}", algorithm=mutant.algorithm, cases=both)
    assert not caught.ok


def test_new_conditions_are_described():
    assert set(covering.factors("Adam")) == set(covering._ORDER)
    assert spec("SGD").sparse_grads and "sparse" in covering.factors("SGD")["grads"]


@pytest.mark.skipif(levels.suite_level() != "full", reason="every covering case of every algorithm: "
                    "OPTPARITY_TEST_LEVEL=full (about a minute of CPU)")
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_torch_against_itself_over_every_covering_case(algo):
    """No false alarm, and no combination left in that only errors (the constraints are complete)."""
    cases = [c for c in levels.select("default", algo) if c.axis == "covering"]
    report = check(f"torch.optim:{algo}", f"torch.optim:{algo}", algorithm=algo, cases=cases)
    assert report.ok, report.first_failure.message
    errors = [r.case.id for r in report.results if r.verdict != "bit_identical"]
    assert not errors, errors[:3]
