"""optparity: reference optimizers proven bit for bit against torch.optim.

    optparity.functional   the math (one module per algorithm)
    optparity.optim        drop-in torch.optim classes
    optparity.distributed  torch.distributed.optim's API
    optparity.check        the bit-for-bit harness (optparity.harness)
    optparity.MIRRORS_TORCH  the torch release these implementations mirror (optparity.versions)
"""
from optparity.harness import check
from optparity.versions import MIRRORS_TORCH, SUPPORTED as SUPPORTED_TORCH

__version__ = "0.1.0"
__all__ = ["check", "MIRRORS_TORCH", "SUPPORTED_TORCH"]
