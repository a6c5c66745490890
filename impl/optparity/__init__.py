"""optparity: reference optimizers proven bit for bit against torch.optim.

    optparity.functional   the math (one module per algorithm)
    optparity.optim        drop-in torch.optim classes
    optparity.distributed  torch.distributed.optim's API
    optparity.check        the bit-for-bit harness (optparity.harness)
"""
from optparity.harness import check

__version__ = "0.1.0"
__all__ = ["check"]
