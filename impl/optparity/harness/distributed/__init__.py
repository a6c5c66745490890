"""The distributed check: anyone's distributed optimizer against torch, bit for bit, over N ranks.

    optparity check --candidate MODULE:Name --kind {zero,local-sgd,fsdp,fsdp1,adapter}
                    --world-sizes 2,3 [--backend gloo|nccl] [--algorithm ALGO]
    optparity.check(candidate, kind=..., world_sizes=[2, 3], backend="gloo")

One harness: cases are matrix.Case subclasses (base.DistCase), differences go into runner's
tracker and verdicts, reports are report.py's. What is distributed lives here:

  base.py      DistCase, the conditions, the Side protocol (one optimizer on one rank) and the
               Driver interface (one kind)
  registry.py  the kinds: every module of kinds/ defining DRIVERS
  matrix.py    the distributed matrix per level
  rank.py      one case as every rank runs it (build, feed, step, compare, reload)
  engine.py    the parent: plan, long-lived ranks per world size (harness/ranks.py), merging the
               ranks' outcomes into one CaseResult per case, hangs and dead ranks
  cli.py       `optparity check --kind/--world-sizes/--backend`
  kinds/       zero.py, local_sgd.py, adapter.py (and fsdp.py): one module per kind

Adding a kind: a module in kinds/ with a base.Driver subclass (detect, validate, build; the
reference defaults to one-process torch.optim on the averaged gradients) and
DRIVERS = (YourDriver(),).
"""
from __future__ import annotations

from optparity.harness.distributed.base import CONDITIONS, DistCase, Driver, Side

__all__ = ["CONDITIONS", "DistCase", "Driver", "Side", "check", "prepare", "run"]


def check(*args, **kwargs):
    from optparity.harness.distributed.engine import check as _check

    return _check(*args, **kwargs)


def prepare(*args, **kwargs):
    from optparity.harness.distributed.engine import prepare as _prepare

    return _prepare(*args, **kwargs)


def run(*args, **kwargs):
    from optparity.harness.distributed.engine import run as _run

    return _run(*args, **kwargs)
