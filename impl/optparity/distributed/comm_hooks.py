"""The post-local SGD DDP communication hook, as
torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook (torch 2.13).

Register with ``ddp_model.register_comm_hook(PostLocalSGDState(...), post_localSGD_hook)``.
For the first ``start_localSGD_iter`` iterations gradients are averaged over the global group,
like plain DDP; afterwards they are averaged within ``subgroup`` only (or not at all when
``post_local_gradient_allreduce`` is False), and a model averager run after the optimizer step
takes over global synchronisation.

Upstream behaviours kept on purpose:
- the iteration counter advances only during the global phase, so it stops at
  ``start_localSGD_iter``;
- with ``subgroup=None`` the subgroup is created lazily, inside the hook, at the first local
  iteration via ``dist.new_subgroups()`` (one group per machine's CUDA devices; on a CPU-only
  machine that call raises ValueError).
"""
# No `from __future__ import annotations` here: DDP's register_comm_hook inspects the hook's
# annotations and accepts only the real dist.GradBucket / Future[Tensor] objects, not strings.
import logging

import torch
import torch.distributed as dist

__all__ = ["PostLocalSGDState", "post_localSGD_hook"]

logger = logging.getLogger(__name__)


def _mean_allreduce(process_group, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    """Average ``tensor`` in place over the group; the future yields the averaged tensor."""
    group = process_group if process_group is not None else dist.group.WORLD
    # scale before summing so low-precision buckets do not overflow
    tensor.div_(group.size())
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class PostLocalSGDState:
    """What post_localSGD_hook needs: the global group (None: the world), the local
    ``subgroup`` (None: one per machine, created on first use), the iteration at which local SGD
    starts, whether gradients are still averaged within the subgroup afterwards, and ``iter``,
    the number of iterations seen so far (counted during the global phase only)."""

    __slots__ = [
        "process_group",
        "subgroup",
        "start_localSGD_iter",
        "post_local_gradient_allreduce",
        "iter",
    ]

    def __init__(self, process_group, subgroup, start_localSGD_iter, post_local_gradient_allreduce=True):
        logger.info("Local SGD will be started after %s iterations", start_localSGD_iter)
        self.process_group = process_group
        self.subgroup = subgroup
        self.start_localSGD_iter = start_localSGD_iter
        self.post_local_gradient_allreduce = post_local_gradient_allreduce
        self.iter = 0

    def maybe_increase_iter(self, bucket):
        """Count one iteration per backward pass: DDP reduces the last bucket last."""
        if bucket.is_last():
            self.iter += 1
        if self.iter == self.start_localSGD_iter:
            logger.info("Start to apply local SGD after %s iterations.", self.iter)


def post_localSGD_hook(
    state: PostLocalSGDState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: global gradient averaging before ``state.start_localSGD_iter``, then
    subgroup averaging (or none). Updates the bucket's flat gradient buffer in place."""
    global_group = state.process_group if state.process_group is not None else dist.group.WORLD
    grads = bucket.buffer()

    if state.iter < state.start_localSGD_iter:
        state.maybe_increase_iter(bucket)
        return _mean_allreduce(global_group, grads)

    if not state.post_local_gradient_allreduce:
        # purely local gradients from here on
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(grads)
        return done

    if state.subgroup is None:
        state.subgroup, _ = dist.new_subgroups()
    return _mean_allreduce(state.subgroup, grads)
