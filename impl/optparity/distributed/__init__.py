"""optparity.distributed — torch.distributed.optim's API, implemented over optparity.functional."""
