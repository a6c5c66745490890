"""optparity: reference optimizers proven bit for bit against torch.optim.

    optparity.functional   the math (one module per algorithm)
    optparity.optim        drop-in torch.optim classes
    optparity.distributed  torch.distributed.optim's API
    optparity.check        the bit-for-bit harness (optparity.harness)
    optparity.MIRRORS_TORCH  the torch release these implementations mirror (optparity.versions)
"""
import os as _os
import sys as _sys

# A case on two threads often runs beside other work (the other check worker, a shared CI runner):
# with libgomp's default wait each parallel region can spin on a descheduled thread, and a case of
# 1.5 s took minutes and was reported hung. A short spin before sleeping keeps that bounded without
# paying a wake-up per region: LBFGS's covering case of 48,000 small dots took 6.8 s fully passive
# (OMP_WAIT_POLICY=PASSIVE), 1.75 s with this spin, 5.8 s with both cores busy (passive: 5.1 s).
# Timing only, never a result. OpenMP reads it once, when torch loads; a user's own setting wins,
# and `optparity bench` keeps torch's default so its latencies are the ones users get.
if ("torch" not in _sys.modules and _sys.argv[1:2] != ["bench"]
        and "OMP_WAIT_POLICY" not in _os.environ):
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from optparity.harness import check  # noqa: E402
from optparity.versions import MIRRORS_TORCH, SUPPORTED as SUPPORTED_TORCH

__version__ = "0.1.0"
__all__ = ["check", "MIRRORS_TORCH", "SUPPORTED_TORCH"]
