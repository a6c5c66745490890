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
# with libgomp's default active wait each parallel region then spins on a descheduled thread, and
# a case of 1.5 s took minutes and was reported hung. Passive waiting changes timing, never a
# result. OpenMP reads it once, when torch loads; a user's own setting wins, and `optparity bench`
# keeps torch's default so its latencies are the ones users get.
if "torch" not in _sys.modules and _sys.argv[1:2] != ["bench"]:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from optparity.harness import check  # noqa: E402
from optparity.versions import MIRRORS_TORCH, SUPPORTED as SUPPORTED_TORCH

__version__ = "0.1.0"
__all__ = ["check", "MIRRORS_TORCH", "SUPPORTED_TORCH"]
