"""Where torch's own torch.distributed.optim functional optimizers differ from torch.optim.

optparity's Functional* classes reproduce upstream's bit for bit; whether upstream itself matches
torch.optim is a separate fact, recorded in reference/upstream_functional_vs_torch_optim.json and
re-checked by suites/conformance/test_upstream_functional.py.

    python -m optparity.harness.upstream --write    # re-record (after a torch upgrade)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from optparity.harness.algorithms import SPECS
from optparity.harness.check import check

# torch.distributed.optim has functional optimizers for these only.
ALGORITHMS = tuple(name for name, s in SPECS.items() if s.functional_upstream)
RECORD = Path(__file__).resolve().parents[3] / "reference" / "upstream_functional_vs_torch_optim.json"


def upstream_functional(algo: str) -> str:
    return f"torch.distributed.optim.functional_{algo.lower()}:_Functional{algo}"


def divergences(algo: str, level: str = "default") -> tuple[dict[str, str], set[str]]:
    """(case id -> first divergence for every case where upstream's Functional class differs,
    the ids of every case run) at `level`."""
    report = check(upstream_functional(algo), f"torch.optim:{algo}", level=level)
    return {r.case.id: r.message for r in report.failed}, {r.case.id for r in report.results}


def record() -> dict[str, dict[str, str]]:
    import torch

    return {"torch": torch.__version__, **{algo: divergences(algo)[0] for algo in ALGORITHMS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"write {RECORD}")
    args = parser.parse_args()
    data = record()
    for algo in ALGORITHMS:
        print(f"{algo:9s} {len(data[algo]):4d} cases differ")
    if args.write:
        RECORD.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD}")


if __name__ == "__main__":
    main()
