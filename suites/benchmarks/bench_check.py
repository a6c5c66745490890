"""Throughput of the conformance check itself: cases per second of `optparity check` for one
algorithm, in this process and in worker processes, at the quick and default levels.

Commits before the check engine (harness/levels.py, run(workers=)) raise NotImplementedError in
setup, which asv records as skipped.
"""
from __future__ import annotations

import inspect


class CheckThroughput:
    params = [["Adam", "SGD"], ["quick", "default"], [1, 2]]
    param_names = ["algorithm", "level", "workers"]
    unit = "cases/s"
    timeout = 900
    number = 1
    repeat = 2

    def setup(self, algorithm, level, workers):
        try:
            from optparity.harness.check import prepare, run
        except ImportError:
            raise NotImplementedError("this commit has no check engine") from None
        if "workers" not in inspect.signature(run).parameters:
            raise NotImplementedError("this commit's check has no worker processes")
        self.run = run
        self.plan = prepare(f"optparity.optim:{algorithm}", level=level)
        # torch.optim's first step imports torch._dynamo (seconds): not what is measured here.
        run(prepare(f"optparity.optim:{algorithm}", cases=self.plan.cases[:1]))

    def track_cases_per_second(self, algorithm, level, workers):
        return self.run(self.plan, workers=workers).cases_per_second
