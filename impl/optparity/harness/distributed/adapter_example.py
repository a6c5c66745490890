"""The worked example of the adapter protocol (docs/distributed-check.md): torch's
ZeroRedundancyOptimizer seen through the protocol, in the twenty lines a user writes.

    optparity check --candidate optparity.harness.distributed.adapter_example:ZeroAdapter --kind adapter
"""
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer


class ZeroAdapter:
    def __init__(self, param_groups, optimizer_class, process_group=None, **hyper):
        self.params = [p for group in param_groups for p in group["params"]]
        self.group = process_group
        self.opt = ZeroRedundancyOptimizer(param_groups, optimizer_class, process_group=process_group, **hyper)

    def set_gradients(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g

    def step(self):
        self.opt.step()

    def full_params(self):
        return self.params

    def full_state_dict(self):
        self.opt.consolidate_state_dict(to=0)
        return self.opt.state_dict() if dist.get_rank(self.group) == 0 else None

    def load_state_dict(self, state_dict):
        self.opt.load_state_dict(state_dict)
