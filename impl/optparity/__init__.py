"""optparity: reference optimizers proven bit for bit against torch.optim."""
__version__ = "0.1.0"
