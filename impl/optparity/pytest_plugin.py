"""The conformance check inside a user's own pytest run (entry point `optparity`, group pytest11).

Each case of the matrix becomes one test item with the case id as its id, so pytest's own -k,
xdist (-n) and JUnit (--junitxml) apply. Two ways in:

  * command line: `pytest --optparity-candidate mypkg:MyAdam [--optparity-reference torch.optim:Adam]
    [--optparity-level quick]` adds the items under a test module named after the candidate; or
  * a test function marked `@pytest.mark.optparity("mypkg:MyAdam", reference=..., level="quick",
    **check options)` taking the fixture `optparity_case`: it is parametrised over the cases, and
    `optparity_case.assert_ok()` fails with the verdict.
"""
from __future__ import annotations

import sys

import pytest

# optparity itself (torch, the algorithm registry) is imported only when the plugin is used, so a
# pytest run that never asks for it does not pay for it.
_PLAN_OPTIONS = ("algorithm", "level", "paths", "dtypes", "param_sets", "steps", "case_filter", "hyper",
                 "numerics_only", "max_ulp", "rounding_ulp")
# a distributed optimizer over ranks (optparity.harness.distributed): the same items, one per case
_DISTRIBUTED_OPTIONS = ("kind", "world_sizes", "backend")
_POOLS = {}  # backend -> the session's long-lived ranks (harness/distributed/engine.Pools)


def pytest_addoption(parser):
    group = parser.getgroup("optparity", "optparity conformance check")
    group.addoption("--optparity-candidate", metavar="MODULE:NAME", help="check this optimizer case by case")
    group.addoption("--optparity-reference", metavar="MODULE:NAME", help="default: torch.optim's same name")
    group.addoption("--optparity-level", default=None, help="quick, default or full (default: the marker's, or default)")
    group.addoption("--optparity-numerics-only", action="store_true", help="layout differences do not fail")
    group.addoption("--optparity-kind", default=None,
                    help="a distributed optimizer: zero, local-sgd, fsdp, fsdp1 or adapter (docs/distributed-check.md)")
    group.addoption("--optparity-world-sizes", default=None, metavar="N[,N...]", help="world sizes (default 2,3)")
    group.addoption("--optparity-backend", default=None, help="gloo (default) or nccl")


def pytest_configure(config):
    config.addinivalue_line("markers", "optparity(candidate, reference=None, **options): parametrise the "
                                       "test over the conformance cases of candidate (fixture optparity_case)")


class OptparityCase:
    """One case of a plan, run on demand."""

    def __init__(self, plan, case):
        self.plan, self.case = plan, case
        self.result = None

    def run(self):
        from optparity.harness.runner import run_case

        if self.result is None:
            if hasattr(self.plan, "kind"):  # a distributed plan: its case runs in the session's ranks
                from optparity.harness.distributed.engine import Pools, run_case as run_distributed

                pools = _POOLS.setdefault(self.plan.backend, Pools(self.plan.backend, 120.0))
                self.result = run_distributed(self.plan, self.case, pools)
            else:
                self.result = run_case(self.case, self.plan.candidate, self.plan.reference, **self.plan.run_options)
        return self.result

    def assert_ok(self):
        from optparity.harness.runner import Verdict

        r = self.run()
        if r.verdict == Verdict.NOT_APPLICABLE:
            pytest.skip(f"not applicable: {r.message}")
        if r.status == "fail":
            detail = f"\n{r.traceback}" if r.traceback else ""
            pytest.fail(f"{Verdict.LABELS[r.verdict]}"
                        + (f" ({r.math})" if r.math else "") + f": {r.message}{detail}", pytrace=False)
        return r


def _plan(candidate, reference, options):
    if any(options.get(k) is not None for k in _DISTRIBUTED_OPTIONS):
        from optparity.harness.distributed.engine import prepare as prepare_distributed

        return prepare_distributed(candidate, reference,
                                   **{k: v for k, v in options.items() if k in _PLAN_OPTIONS + _DISTRIBUTED_OPTIONS})
    from optparity.harness.check import prepare

    return prepare(candidate, reference, **{k: v for k, v in options.items() if k in _PLAN_OPTIONS})


def _distributed_options(config) -> dict:
    sizes = config.getoption("--optparity-world-sizes")
    return {"kind": config.getoption("--optparity-kind"), "backend": config.getoption("--optparity-backend"),
            "world_sizes": [int(w) for w in sizes.split(",")] if sizes else None}


def pytest_unconfigure(config):
    for pools in _POOLS.values():
        pools.close()
    _POOLS.clear()


def pytest_generate_tests(metafunc):
    if "optparity_case" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("optparity")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid} uses optparity_case without @pytest.mark.optparity(...)")
    candidate = marker.args[0] if marker.args else marker.kwargs.get("candidate")
    options = {k: v for k, v in marker.kwargs.items() if k not in ("candidate", "reference")}
    level = metafunc.config.getoption("--optparity-level")
    if level:
        options["level"] = level
    plan = _plan(candidate, marker.kwargs.get("reference"), options)
    metafunc.parametrize("optparity_case", [OptparityCase(plan, c) for c in plan.cases],
                         ids=[c.id for c in plan.cases])


class CaseItem(pytest.Item):
    def __init__(self, *, case: OptparityCase, **kwargs):
        super().__init__(**kwargs)
        self.optparity_case = case

    def runtest(self):
        self.optparity_case.assert_ok()

    def reportinfo(self):
        return self.path, None, f"optparity {self.name}"


class CandidateCollector(pytest.Collector):
    """The cases of --optparity-candidate, collected as items named by case id."""

    def __init__(self, *, plan, **kwargs):
        super().__init__(**kwargs)
        self.plan = plan

    def collect(self):
        for case in self.plan.cases:
            yield CaseItem.from_parent(self, name=case.id, case=OptparityCase(self.plan, case))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """--optparity-candidate: the session collects one more child, the candidate's cases."""
    report = yield
    config = collector.config
    candidate = config.getoption("--optparity-candidate")
    if not candidate or not isinstance(collector, pytest.Session) or report.outcome != "passed":
        return report
    # like `optparity check`: a candidate module in the folder pytest was started from imports
    here = str(config.invocation_params.dir)
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    options = {"level": config.getoption("--optparity-level") or "default",
               "numerics_only": config.getoption("--optparity-numerics-only"), **_distributed_options(config)}
    try:
        plan = _plan(candidate, config.getoption("--optparity-reference"), options)
    except ValueError as e:
        raise pytest.UsageError(f"--optparity-candidate {candidate}: {e}") from e
    report.result.append(CandidateCollector.from_parent(collector, name=f"optparity[{candidate}]", plan=plan))
    return report
