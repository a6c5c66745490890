"""optparity.optim — drop-in replacements for torch.optim's classes."""
