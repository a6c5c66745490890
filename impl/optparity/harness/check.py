"""optparity.check: run a candidate optimizer against its reference over the case matrix."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from optparity.harness import matrix
from optparity.harness.runner import CaseResult, Subject, default_reference, run_case


@dataclass
class CheckReport:
    candidate: str
    reference: str
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def ok(self) -> bool:
        """True only when every case ran and every one is bit-identical."""
        return bool(self.results) and not self.failed and any(r.status == "pass" for r in self.results)

    @property
    def first_failure(self) -> CaseResult | None:
        return self.failed[0] if self.failed else None

    @property
    def worst_ulp(self) -> int:
        return max((r.worst_ulp for r in self.results), default=0)

    @property
    def cases_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds else 0.0


def check(candidate: Any, reference: Any = None, *, algorithm: str | None = None,
          paths: Iterable[str] = matrix.PATHS, dtypes=matrix.DTYPES,
          param_sets: Iterable[str] = matrix.PARAM_SETS, steps: int = matrix.STEPS,
          cases: list[matrix.Case] | None = None, fail_fast: bool = False, threads: int | None = 1,
          progress: Callable[[CaseResult], None] | None = None) -> CheckReport:
    """Compare `candidate` with `reference` (default: torch.optim's class of the same name).

    candidate / reference: "module:Name" strings or the objects themselves — a torch.optim-style
    class, a functional class with step(gradients), or a functional kernel.
    threads: torch intra-op threads while checking (None leaves the setting alone). One by default:
    the tensors are tiny, and torch's OpenMP kernels (the fused ones especially) slow down tenfold
    when their threads compete for cores with other work.
    """
    cand = Subject.of(candidate, algorithm)
    ref = default_reference(cand) if reference is None else Subject.of(reference, algorithm or cand.algorithm)
    algo = cand.algorithm or ref.algorithm
    if algo is None:
        raise ValueError(f"cannot tell which algorithm {cand.label} implements: pass algorithm=")
    cand.algorithm = cand.algorithm or algo
    if cases is None:
        cases = matrix.build_cases([algo], tuple(paths), tuple(dtypes), tuple(param_sets), steps)
    report = CheckReport(cand.label, ref.label)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        for case in cases:
            result = run_case(case, cand, ref)
            report.results.append(result)
            if progress:
                progress(result)
            if fail_fast and result.status == "fail":
                break
    finally:
        torch.set_num_threads(previous_threads)
    report.seconds = time.perf_counter() - start
    return report
