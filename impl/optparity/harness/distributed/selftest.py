"""`optparity selftest`'s distributed part: every planted distributed bug (mutants.DIST_MUTANTS)
must be caught by a case carrying its condition, and torch's own distributed classes (and the
adapter example around torch's ZeRO) must pass. Runs the distributed quick level at world sizes
2 and 3, on one set of long-lived ranks."""
from __future__ import annotations

from optparity.harness.distributed.engine import DEFAULT_TIMEOUT, Pools, check
from optparity.harness.distributed.mutants import DIST_MUTANTS

WORLD_SIZES = (2, 3)
# (candidate, kind, algorithm): torch's own classes, never to be flagged
TORCH_CLASSES = (
    ("torch.distributed.optim:ZeroRedundancyOptimizer", "zero", None),
    ("torch.distributed.optim:PostLocalSGDOptimizer", "local-sgd", None),
    ("torch.distributed.algorithms.model_averaging.averagers:PeriodicModelAverager", "local-sgd", "SGD"),
    ("torch.distributed.algorithms.model_averaging.hierarchical_model_averager:HierarchicalModelAverager",
     "local-sgd", "SGD"),
    ("optparity.harness.distributed.adapter_example:ZeroAdapter", "adapter", "Adam"),
    # an element-wise torch.optim class is shard-safe on FSDP2 and FSDP1 (docs/distributed-check.md, "FSDP kinds")
    ("torch.optim:Adam", "fsdp", "Adam"),
    ("torch.optim:Adam", "fsdp1", "Adam"),
)


def names() -> list[str]:
    return [m.name for m in DIST_MUTANTS]


def mutant_rows(chosen=None, level: str = "quick", pools: Pools | None = None) -> list[dict]:
    """One row per mutant, as cli's selftest table has them."""
    rows = []
    own = pools is None
    pools = pools or Pools("gloo", DEFAULT_TIMEOUT)
    try:
        for m in DIST_MUTANTS:
            if chosen and m.name not in chosen:
                continue
            report = check(m.candidate, kind=m.kind, world_sizes=list(WORLD_SIZES), algorithm=m.algorithm,
                           level=level, fail_fast=True, pools=pools)
            first = report.first_failure
            rows.append({"mutant": m.name, "algorithm": m.algorithm, "kind": m.kind, "shows_under": m.shows_under,
                         "axis": f"distributed:{m.kind}", "caught": first is not None and m.exposed(first.case),
                         "cases_until_caught": len(report.results),
                         "first_divergence": f"{first.case.id} {first.message}"[:110] if first else "-"})
    finally:
        if own:
            pools.close()
    return rows


def torch_alarms(level: str = "quick", pools: Pools | None = None) -> list[str]:
    """torch's own distributed classes against the check: each false alarm, named."""
    alarms = []
    own = pools is None
    pools = pools or Pools("gloo", DEFAULT_TIMEOUT)
    try:
        for candidate, kind, algorithm in TORCH_CLASSES:
            report = check(candidate, kind=kind, world_sizes=list(WORLD_SIZES), algorithm=algorithm, level=level,
                           pools=pools)
            if not report.ok:
                first = report.first_failure
                alarms.append(f"{candidate} ({kind}): {first.case.id if first else ''} {first.message if first else 'no case passed'}")
    finally:
        if own:
            pools.close()
    return alarms
