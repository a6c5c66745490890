"""torch.distributed.optim's own functional optimizers, checked against torch.optim the same way.

Upstream is not ours to fix, so the test pins *where* it differs: the recorded set of divergent
cases (reference/upstream_functional_vs_torch_optim.json) must be exactly what we observe. A change
either way — a new divergence, or one that disappeared — fails and must be looked at. docs/upstream-findings.md
summarises the divergences."""
import json

import pytest

from optparity import versions
from optparity.harness import levels

from optparity.harness.upstream import ALGORITHMS
from optparity.harness.upstream import RECORD, divergences

RECORDED = json.loads(RECORD.read_text())
# the record pins the divergences of the release optparity mirrors; another release has its own
pytestmark = pytest.mark.skipif(
    not versions.mirrors_installed(),
    reason=f"the record is torch {RECORDED['torch']}'s; `python -m optparity.harness.upstream --write` records this torch's")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_upstream_functional_conformance_is_as_recorded(algo):
    # recorded at the default level; the suite's level runs a subset of those cases
    observed, ran = divergences(algo, levels.suite_level())
    expected = {case: text for case, text in RECORDED[algo].items() if case in ran}
    new = sorted(set(observed) - set(expected))
    gone = sorted(set(expected) - set(observed))
    assert not new and not gone, f"new divergences: {new[:5]} ...; no longer diverging: {gone[:5]} ..."
    changed = [case for case in observed if observed[case] != expected[case]]
    assert not changed, f"first divergence moved for {changed[:5]}"


def test_record_is_for_this_torch():
    import torch

    assert RECORDED["torch"] == torch.__version__
