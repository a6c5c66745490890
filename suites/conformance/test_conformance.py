"""optparity against torch.optim, bit for bit, over the whole case matrix (see
optparity.harness.matrix): each optimizer class, each bare functional kernel, each Functional*
class (against torch.distributed.optim's), on every implementation path."""
from __future__ import annotations

import pytest

from optparity.harness import check, levels
from optparity.harness.algorithms import ALGORITHMS, FUSED_ON_CPU, SPECS
from optparity.harness.matrix import PATHS
from optparity.harness.upstream import upstream_functional

FORMS = {
    "class": "optparity.optim:{algo}",
    "kernel": "optparity.functional:{lower}",
    "functional_class": "optparity.distributed:Functional{algo}",
}


def _params():
    for algo in ALGORITHMS:
        for form in FORMS:
            if form == "functional_class" and not SPECS[algo].functional_upstream:
                continue
            for path in PATHS:
                if path == "fused" and algo not in FUSED_ON_CPU or not _has_path(algo, path):
                    continue
                yield pytest.param(algo, form, path, id=f"{algo}-{form}-{path}")


def _has_path(algo: str, path: str) -> bool:
    """LBFGS, Muon and SparseAdam take no foreach flag: their one path is "default"."""
    import torch

    from optparity.harness import matrix

    return any(matrix._runs(algo, path, dtype) for dtype in (torch.float32, torch.float64))


def assert_bit_identical(report, record_property):
    record_property("cases", len(report.results))
    record_property("check_seconds", report.seconds)
    ran = [r for r in report.results if r.status == "pass"]
    assert ran, "no case ran: every case was not applicable"
    first = report.first_failure
    assert first is None, (f"{len(report.failed)} of {len(report.results)} cases differ; first: "
                           f"{first.case.id}: {first.message}")


def reference_for(form: str, algo: str) -> str:
    # Functional* classes reproduce upstream's functional optimizers, which differ from torch.optim
    # in places (test_upstream_functional.py pins where); everything else reproduces torch.optim.
    if form == "functional_class":
        return upstream_functional(algo)
    return f"torch.optim:{algo}"


@pytest.mark.parametrize("algo,form,path", list(_params()))
def test_optparity_matches_reference(algo, form, path, record_property):
    spec = FORMS[form].format(algo=algo, lower=algo.lower())
    report = check(spec, reference_for(form, algo), algorithm=algo, paths=[path], level=levels.suite_level())
    assert_bit_identical(report, record_property)
