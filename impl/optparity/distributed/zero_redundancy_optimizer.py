"""ZeroRedundancyOptimizer: optimizer state sharded across the ranks of a process group.

Each rank owns a subset of the parameters (a sorted-greedy partition by element count), keeps
optimizer state only for those, steps them with a local optimizer of the user's class, and
then every owner broadcasts its freshly updated shard so all replicas stay equal. The public
surface, the partition, the order of collectives and the state-dict layouts follow
``torch.distributed.optim.ZeroRedundancyOptimizer`` (torch 2.13), so that training with this
class is bit-for-bit the same as with torch's, and state dicts move freely between them and
plain ``torch.optim`` / ``optparity.optim`` optimizers.

The DDP integration (``overlap_with_ddp=True``) lives at the bottom of this module:
``hook_with_zero_step`` and ``hook_with_zero_step_interleaved`` wrap a DDP communication hook so
the sharded step runs inside the backward pass. Like torch, they refuse the Gloo backend.

Where this module departs from torch (never in the numbers produced):
  * ``load_state_dict`` leaves the caller's dict untouched and gives the local optimizer its own
    copies of the state tensors (torch writes ``None`` into the caller's dict and lets the local
    optimizer step the caller's tensors in place);
  * ``load_state_dict`` replaces the whole state, as ``torch.optim.Optimizer.load_state_dict``
    does: a parameter the dict has no state for has none afterwards. torch's ZeRO only
    overwrites the parameters the dict has state for, so loading an older checkpoint into an
    optimizer that has trained since (a rollback in place) keeps the newer state of the others
    (their ``step`` runs on from the later value). Identical whenever the loading optimizer is
    fresh or the dict has state for every parameter it had (suites/distributed/test_optim_state_rollback.py);
  * a parameter group whose ``params`` is a single tensor or a generator is taken as such
    (torch iterates the tensor's rows / exhausts the generator before the group is built);
  * parameters of groups added with ``add_param_group`` take part in the trainability check;
  * with ``overlap_with_ddp=True`` on a process group other than WORLD, bucket ownership is
    looked up by group rank throughout (torch mixes group and global ranks there);
  * consolidated state crosses ranks with ``dist.broadcast_object_list`` on CPU copies.
"""

import collections.abc
import copy
import enum
import inspect
import logging
import weakref
from itertools import chain
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.optim import Optimizer

from optparity.distributed import functional_optim as _functional

__all__ = ["ZeroRedundancyOptimizer", "hook_with_zero_step", "hook_with_zero_step_interleaved"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _copy_to_device(value: Any, device: torch.device, clone: bool = False) -> Any:
    """`value` with every tensor inside lists/tuples/mappings moved to `device`.

    Containers are rebuilt (mappings become plain dicts); with `clone` the tensors never share
    memory with the input even when they already live on `device`."""
    if isinstance(value, torch.Tensor):
        moved = value.to(device)
        if clone and moved is value:
            moved = value.clone()
        return moved
    if isinstance(value, (list, tuple)):
        items = [_copy_to_device(v, device, clone) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, collections.abc.Mapping):
        return {k: _copy_to_device(v, device, clone) for k, v in value.items()}
    return value


def _is_trainable(param: torch.Tensor) -> bool:
    # "trainable" means autograd will produce a gradient for it
    return param.requires_grad


def _torch_functional_classes() -> tuple:
    # torch's own functional optimizers count as functional too (a user may pass one)
    try:
        from torch.distributed.optim.utils import functional_optim_map as torch_map
    except Exception:  # noqa: BLE001 - torch builds without distributed.optim
        return ()
    return tuple(torch_map.values())


def _functional_map() -> dict:
    register = getattr(_functional, "_register_optparity_classes", None)
    if register is not None:
        register()  # optparity.optim classes may have been imported after functional_optim
    return _functional.functional_optim_map


# ---------------------------------------------------------------------------
# Join support
# ---------------------------------------------------------------------------

class _ZeROJoinHook(JoinHook):
    """Shadows a ZeRO step on a rank that ran out of inputs, so the owners' broadcasts match."""

    def __init__(self, zero):
        if not isinstance(zero, ZeroRedundancyOptimizer):
            raise AssertionError(
                "ZeRO join hook requires passing in a ZeroRedundancyOptimizer instance as the state"
            )
        self.zero = zero
        super().__init__()

    def main_hook(self):
        # a joined rank still owns a shard: step it and take part in every broadcast
        self.zero.step()


# ---------------------------------------------------------------------------
# bookkeeping for overlap_with_ddp=True
# ---------------------------------------------------------------------------

class _DDPBucketAssignment:
    """The slice of one DDP gradient bucket that one rank updates.

    `offset` is the index of the slice's first parameter inside the bucket's parameter (and
    gradient) list; `tensor` is the flat buffer the slice's parameters are views into."""

    def __init__(self, bucket_index: int, parameters: list[torch.Tensor], offset: int):
        self.bucket_index = bucket_index
        self.parameters = parameters
        self.offset = offset
        if len(self.parameters) == 0:
            raise ValueError("Empty bucket assignment")
        # DDP puts only same-device parameters in one bucket
        self.device: torch.device = self.parameters[0].device
        self.tensor: torch.Tensor | None = None


class _OverlapStatus(enum.IntEnum):
    """Where a ZeRO instance overlapping with DDP is in its delayed set-up."""

    UNINITIALIZED = 0  # DDP has not finalised its buckets yet
    DDP_HAS_REBUILT_BUCKETS = 1  # buckets are final; their layout is being recorded
    INITIALIZED = 2  # local optimizer built; steps run inside the comm hook


class _OverlapInfo:
    """What the DDP comm hook and ZeRO share when the step overlaps the backward pass."""

    def __init__(self, world_size) -> None:
        self.status: _OverlapStatus = _OverlapStatus.UNINITIALIZED
        self.shard_buckets: bool = False

        # recomputed whenever DDP's bucketing is (re)recorded
        self.params_per_bucket: list[list[torch.Tensor]] = []
        self.params_per_rank: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
        self.offsets: dict[int, int] = {}  # bucket index -> first local-optimizer index
        self.assigned_ranks_per_bucket: list[set[int]] = []
        self.num_bucket_assignments: int = 0
        self.total_size: int | None = None

        # reset every iteration
        self.broadcast_handles: list[Any] = []
        self.bucket_indices_seen: list[int] = []
        self.bucket_index_to_future: dict[int, torch.futures.Future] = {}
        self.bucket_index_to_bucket: dict[int, dist.GradBucket] = {}

    def wait_for_broadcasts(self) -> None:
        """Block until every parameter broadcast of this iteration is done, then forget them."""
        if len(self.broadcast_handles) != self.num_bucket_assignments:
            raise AssertionError(f"Missing at least one broadcast handle on rank {dist.get_rank()}")
        for handle in self.broadcast_handles:
            handle.wait()
        self.broadcast_handles.clear()

    def clear_per_iter_info(self) -> None:
        self.bucket_indices_seen.clear()
        self.bucket_index_to_future.clear()
        self.bucket_index_to_bucket.clear()


# ---------------------------------------------------------------------------
# the optimizer
# ---------------------------------------------------------------------------

class ZeroRedundancyOptimizer(Optimizer, Joinable):
    """Wrap an optimizer class so each rank of `process_group` keeps state for ~1/world_size
    of the parameters, updates only those, and broadcasts them to its peers after each step.

    Arguments and behaviour are those of torch.distributed.optim.ZeroRedundancyOptimizer:

    params: tensors or parameter-group dicts (all parameters of one dense tensor type).
    optimizer_class: the local optimizer's class (torch.optim-style; with overlap_with_ddp a
        functional optimizer or a class that has one).
    process_group: defaults to the WORLD group.
    parameters_as_bucket_view: parameters become views into one flat buffer per device and
        owning rank, so each owner sends one tensor per device instead of one per parameter.
    overlap_with_ddp: run the step inside a DDP comm hook built with hook_with_zero_step /
        hook_with_zero_step_interleaved (NCCL only); the local optimizer is created once DDP's
        buckets are final and step() becomes a no-op.
    **defaults: forwarded to the local optimizer.
    """

    def __init__(
        self,
        params,
        optimizer_class: type[Optimizer],
        process_group: Any | None = None,
        parameters_as_bucket_view: bool = False,
        overlap_with_ddp: bool = False,
        **defaults: Any,
    ):
        params = self._verify_and_init_params(params)
        self._verify_same_dense_param_type()

        # Optimizer.__init__ calls add_param_group, which must then only do the base work
        self.initialized = False

        Optimizer.__init__(self, params, defaults)
        Joinable.__init__(self)

        # lazily computed partition data (cleared whenever the groups change)
        self._param_to_rank_cache: dict[torch.Tensor, int] = {}
        self._param_to_index_cache: dict[torch.Tensor, int] = {}
        self._partition_parameters_cache: list[list[dict]] = []
        self._index_to_param_cache: list[torch.Tensor] = []
        self._device_to_params_per_rank_cache: dict[torch.device, list[list[torch.Tensor]]] = {}
        self._bucket_assignments_per_rank_cache: list[dict[int, _DDPBucketAssignment]] = []
        self._is_trainable_mask = self._get_is_trainable_mask()

        # collectives and dummy buckets use the first parameter's device
        self._default_device = self._all_params[0].device

        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size: int = dist.get_world_size(self.process_group)
        self.rank: int = dist.get_rank(self.process_group)
        self.global_rank: int = dist.distributed_c10d.get_global_rank(self.process_group, self.rank)

        self._overlap_with_ddp: bool = overlap_with_ddp
        self._optim_defaults = defaults
        self._optim_constructor = self._get_optimizer_constructor(optimizer_class)

        if not overlap_with_ddp:
            self._init_local_optimizer()
        else:
            # the partition follows DDP's buckets, which are only known after a few iterations
            self._overlap_info: _OverlapInfo = _OverlapInfo(self.world_size)
            if parameters_as_bucket_view:
                logger.warning(
                    "parameters_as_bucket_view=True has no effect with overlap_with_ddp=True: "
                    "parameters are packed following DDP's gradient buckets instead"
                )

        self.parameters_as_bucket_view = parameters_as_bucket_view
        self._buckets: list[list[torch.Tensor]] = []  # [device][rank] flat buffers
        self._build_param_buckets()

        # filled only on the rank that consolidate_state_dict() targets
        self._all_state_dicts: list[dict[str, Any]] = []

        self.initialized = True

    # -- validation ---------------------------------------------------------

    def _verify_and_init_params(self, params: Any) -> list[torch.Tensor] | list[dict]:
        """Check `params`, record every parameter in self._all_params, and return `params` as a
        list (so it can be walked again by Optimizer.__init__)."""
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "`params` argument should be an iterable of Tensors, but got "
                f"{torch.typename(params)}"
            )
        try:
            all_params = list(params)
        except TypeError as e:
            raise TypeError(
                "`params` argument should be an iterable of Tensors or dicts, but got "
                f"{torch.typename(params)}"
            ) from e
        if len(all_params) == 0:
            raise ValueError("ZeroRedundancyOptimizer got an empty parameter list")
        all_tensors = all(isinstance(p, torch.Tensor) for p in all_params)
        all_dicts = all(isinstance(p, dict) for p in all_params)
        if not all_tensors and not all_dicts:
            raise TypeError("`params` argument should be an iterable of Tensors or dicts")
        if all_tensors:
            self._all_params = all_params
            return all_params
        for group in all_params:
            if "params" not in group:
                raise ValueError(
                    "Each parameter group passed-in via `params` must have a 'params' key "
                    "mapping to the parameters in the group"
                )
        self._all_params = []
        for group in all_params:
            members = group["params"]
            if isinstance(members, torch.Tensor):
                members = [members]
            elif not isinstance(members, (list, tuple, set)):
                # materialise generators once, for both us and Optimizer.add_param_group
                members = list(members)
                group["params"] = members
            self._all_params.extend(members)
        return all_params

    def _verify_same_dense_param_type(self) -> None:
        first = self._all_params[0]
        typename = torch.typename(first)
        if first.is_sparse:
            raise ValueError(
                "ZeroRedundancyOptimizer only supports using the same dense type for all "
                f"parameters but got {typename}"
            )
        for param in self._all_params[1:]:
            other = torch.typename(param)
            if other != typename:
                raise ValueError(
                    "ZeroRedundancyOptimizer only supports using the same dense type for all "
                    f"parameters but got both {typename} and {other}"
                )

    def _get_is_trainable_mask(self) -> list[bool]:
        return [_is_trainable(p) for p in self._all_params]

    def _get_optimizer_constructor(self, optimizer_class: Any) -> Any:
        """The class to build the local optimizer from: `optimizer_class` itself, or with
        overlap_with_ddp its functional counterpart."""
        fmap = _functional_map()
        functional_classes = set(fmap.values()) | set(_torch_functional_classes())
        if not self._overlap_with_ddp:
            if optimizer_class in functional_classes:
                raise ValueError(
                    f"Passing in a functional optimizer {optimizer_class} when "
                    "`overlap_with_ddp=False`"
                )
            return optimizer_class
        if optimizer_class in functional_classes:
            return optimizer_class
        if optimizer_class in fmap:
            functional_cls = fmap[optimizer_class]
            logger.info(
                "overlap_with_ddp=True: stepping with the functional %s in place of %s",
                functional_cls, optimizer_class,
            )
            return functional_cls
        raise ValueError(
            "Using `ddp_with_overlap=True` requires using a functional optimizer, but there is "
            f"no supported functional optimizer equivalent for {optimizer_class}"
        )

    # -- partition ----------------------------------------------------------

    def _clear_cache(self) -> None:
        self._partition_parameters_cache.clear()
        self._param_to_rank_cache.clear()
        self._index_to_param_cache.clear()
        self._param_to_index_cache.clear()
        self._device_to_params_per_rank_cache.clear()
        self._bucket_assignments_per_rank_cache.clear()

    @staticmethod
    def _get_min_index(values: list[int], disallowed_indices: set[int] | None = None) -> int:
        """Index of the first smallest value, skipping `disallowed_indices` (one pass)."""
        best_index = -1
        best_value = float("inf")
        for i, value in enumerate(values):
            if disallowed_indices and i in disallowed_indices:
                continue
            if value < best_value:  # strict: ties go to the lowest index
                best_index, best_value = i, value
        if best_index < 0:
            raise AssertionError("All indices are disallowed")
        return best_index

    def _verify_params_per_rank(self, params_per_rank: list[list[torch.Tensor]]) -> None:
        if len(params_per_rank) != self.world_size:
            raise ValueError("`params_per_rank` must have length equal to the world size")
        known = set(self._all_params)
        for params in params_per_rank:
            for param in params:
                if param not in known:
                    raise ValueError(
                        "Passing a new parameter in `params_per_rank` that was not passed into "
                        "the ZeroRedundancyOptimizer constructor"
                    )

    def _partition_param_group(self, param_group: dict[str, Any],
                               params_per_rank: list[list[torch.Tensor]]) -> None:
        # every rank's share of a group keeps the group's hyperparameters
        for rank, params in enumerate(params_per_rank):
            share = copy.copy(param_group)
            share["params"] = params
            self._partition_parameters_cache[rank].append(share)

    def _partition_parameters(
        self, params_per_rank: list[list[torch.Tensor]] | None = None,
    ) -> list[list[dict]]:
        """Per rank, its share of every parameter group (element [r] is rank r's param_groups).

        Without `params_per_rank`: within each group, parameters go largest first to the rank
        with the fewest elements so far, the running totals carrying over from group to group.
        With it: that explicit assignment (single parameter group only, before any partition).
        """
        if params_per_rank is None:
            if len(self._partition_parameters_cache) == 0:
                self._partition_parameters_cache = [[] for _ in range(self.world_size)]
                load = [0] * self.world_size  # shared by all groups on purpose
                for group in self.param_groups:
                    shares: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
                    # stable sort: equal sizes keep their order in the group
                    for param in sorted(group["params"], key=lambda t: t.numel(), reverse=True):
                        owner = self._get_min_index(load)
                        shares[owner].append(param)
                        load[owner] += param.numel()
                    self._partition_param_group(group, shares)
            return self._partition_parameters_cache

        if len(self._partition_parameters_cache) != 0:
            raise AssertionError(
                "Specifying `params_per_rank` should only be done when the parameters have not "
                "been partitioned yet"
            )
        if len(self.param_groups) != 1:
            raise RuntimeError("Specifying `params_per_rank` only supports a single parameter group")
        self._verify_params_per_rank(params_per_rank)
        self._partition_parameters_cache = [[] for _ in range(self.world_size)]
        self._partition_param_group(self.param_groups[0], params_per_rank)
        return self._partition_parameters_cache

    @property
    def _param_to_rank(self) -> dict[torch.Tensor, int]:
        """Parameter -> group rank that owns (updates) it."""
        if len(self._param_to_rank_cache) == 0:
            for rank, groups in enumerate(self._partition_parameters()):
                for group in groups:
                    for param in group["params"]:
                        self._param_to_rank_cache[param] = rank
        return self._param_to_rank_cache

    @property
    def _param_to_index(self) -> dict[torch.Tensor, int]:
        """Parameter -> its index in a state dict (groups concatenated in order)."""
        if len(self._param_to_index_cache) == 0:
            self._param_to_index_cache = {
                p: i for i, p in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))
            }
        return self._param_to_index_cache

    @property
    def _index_to_param(self) -> list[torch.Tensor]:
        """State-dict index -> parameter."""
        if len(self._index_to_param_cache) == 0:
            self._index_to_param_cache = list(chain.from_iterable(g["params"] for g in self.param_groups))
        return self._index_to_param_cache

    @property
    def _device_to_params_per_rank(self) -> dict[torch.device, list[list[torch.Tensor]]]:
        """Device -> per rank, that rank's parameters stored on the device (bucket layout)."""
        if not self.parameters_as_bucket_view:
            raise AssertionError(
                "`_device_to_params_per_rank` should only be used if `parameters_as_bucket_view=True`"
            )
        if len(self._device_to_params_per_rank_cache) == 0:
            cache = self._device_to_params_per_rank_cache
            for rank, groups in enumerate(self._partition_parameters()):
                for group in groups:
                    for param in group["params"]:
                        per_rank = cache.setdefault(param.device, [[] for _ in range(self.world_size)])
                        per_rank[rank].append(param)
        return self._device_to_params_per_rank_cache

    # -- local optimizer ----------------------------------------------------

    def _init_local_optimizer(self) -> None:
        """Build self.optim over this rank's share of every parameter group."""
        if self._optim_constructor is None:
            raise AssertionError("The local optimizer class has not been set")
        my_groups = self._partition_parameters()[self.rank]
        if self._overlap_with_ddp:
            # functional optimizers take one flat parameter list
            if len(my_groups) != 1:
                raise AssertionError(
                    "Initializing the local functional optimizer with more than one parameter group"
                )
            params = my_groups[0]["params"]
            accepts_empty = "_allow_empty_param_list" in inspect.signature(self._optim_constructor).parameters
            if accepts_empty:
                self.optim: Any = self._optim_constructor(
                    params, **self._optim_defaults, _allow_empty_param_list=True
                )
            else:
                logger.warning(
                    "%s has no `_allow_empty_param_list` argument; a rank that owns no "
                    "parameters may fail to build it", self._optim_constructor,
                )
                self.optim = self._optim_constructor(params, **self._optim_defaults)
            if dist.get_debug_level() != dist.DebugLevel.OFF:
                owned = sum(p.numel() for p in params)
                n_assigned = len(self._bucket_assignments_per_rank[self.rank])
                logger.info("rank %s: %s elements in %s bucket assignments",
                            self.global_rank, owned, n_assigned)
                if self.global_rank == 0:
                    logger.info("%s DDP buckets, %s bucket assignments",
                                len(self._overlap_info.params_per_bucket),
                                self._overlap_info.num_bucket_assignments)
        else:
            # groups (not a bare list) so an empty share is accepted by the constructor
            self.optim = self._optim_constructor(my_groups, **self._optim_defaults)

        if self._overlap_with_ddp and not hasattr(self.optim, "param_groups"):
            if not hasattr(self.optim, "param_group"):
                raise AssertionError(
                    "The functional optimizer should set at least one of the attributes "
                    "`param_group` or `param_groups`"
                )
            self.optim.param_groups = [self.optim.param_group]

        # the local optimizer's defaults become visible in our param_groups
        self._sync_param_groups(self.optim.param_groups, self.param_groups)

    @staticmethod
    def _sync_param_groups(src_param_groups: list[dict], dst_param_groups: list[dict]) -> None:
        """Copy every hyperparameter (all keys but 'params') from src groups to dst groups."""
        if len(src_param_groups) != len(dst_param_groups):
            raise AssertionError("Mismatch between number of source and destination parameter groups")
        for src, dst in zip(src_param_groups, dst_param_groups):
            for key in src.keys():
                if key != "params":
                    dst[key] = src[key]

    # -- buckets ------------------------------------------------------------

    def _build_param_buckets(self) -> None:
        """With parameters_as_bucket_view: one flat buffer per (device, rank) holding the
        trainable parameters that rank owns on that device, each parameter's .data a view."""
        if not self.parameters_as_bucket_view or self._overlap_with_ddp:
            return
        layout = self._device_to_params_per_rank
        self._buckets = [[] for _ in range(len(layout))]
        for dev_i, (device, params_per_rank) in enumerate(layout.items()):
            for params in params_per_rank:
                size = 0
                dtype = None
                members = []
                for param in params:
                    if _is_trainable(param):
                        size += param.numel()
                        members.append(param)
                    else:
                        # leave the bucket: own memory, so rebuilding the bucket cannot clobber it
                        param.data = param.data.detach().clone()
                    dtype = param.dtype  # one dense type for all (checked at construction)
                if size == 0:
                    # keep one buffer per rank so every rank issues the same broadcasts
                    bucket = torch.zeros(1, device=device)
                else:
                    bucket = torch.empty(size, dtype=dtype, device=device)
                    start = 0
                    for param in members:
                        end = start + param.numel()
                        bucket[start:end].copy_(param.data.flatten())
                        param.data = bucket[start:end].view_as(param.data)
                        start = end
                self._buckets[dev_i].append(bucket)

    def _build_ddp_param_buckets(self) -> None:
        """overlap_with_ddp: a flat buffer per bucket assignment, parameters viewing into it."""
        for assignments in self._bucket_assignments_per_rank:
            for assignment in assignments.values():
                params = assignment.parameters
                size = 0
                dtype = None
                for param in params:
                    if not _is_trainable(param):
                        raise AssertionError(
                            "Model parameter corresponding to a gradient in a DDP bucket should "
                            "require a gradient"
                        )
                    size += param.numel()
                    dtype = param.dtype
                if size <= 0:
                    raise AssertionError("Empty bucket")
                flat = torch.empty(size, dtype=dtype, device=assignment.device)
                start = 0
                for param in params:
                    end = start + param.numel()
                    flat[start:end].copy_(param.data.flatten())
                    param.data = flat[start:end].view_as(param.data)
                    start = end
                assignment.tensor = flat

    # -- param groups -------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (collective: call it on every rank, with the same group).

        The new parameters are partitioned after the existing ones, whose owners do not change,
        so the local optimizers only gain a group."""
        if self.initialized and self._overlap_with_ddp:
            raise RuntimeError(
                "ZeroRedundancyOptimizer with `overlap_with_ddp=True` only supports a single "
                "parameter group"
            )
        Optimizer.add_param_group(self, param_group)
        if not self.initialized:
            return
        added = self.param_groups[-1]["params"]
        self._all_params.extend(added)
        self._is_trainable_mask.extend(_is_trainable(p) for p in added)

        self._clear_cache()
        my_groups = self._partition_parameters()[self.rank]
        if len(my_groups) == len(self.optim.param_groups) + 1:
            self.optim.add_param_group(my_groups[-1])
        if self.parameters_as_bucket_view:
            self._build_param_buckets()

    # -- stepping -----------------------------------------------------------

    def _broadcast_params_from_rank(self, rank: int) -> list:
        """Start broadcasting group rank `rank`'s shard; the async work handles."""
        if self._overlap_with_ddp:
            raise AssertionError(
                "`_broadcast_params_from_rank()` should not be used if `overlap_with_ddp=True`; "
                "instead, the broadcasting should happen in the DDP communication hook"
            )
        src = dist.distributed_c10d.get_global_rank(self.process_group, rank)
        handles = []
        if self.parameters_as_bucket_view:
            for per_rank in self._buckets:
                handles.append(dist.broadcast(per_rank[rank], src=src, group=self.process_group,
                                              async_op=True))
        else:
            for group in self._partition_parameters()[rank]:
                for param in group["params"]:
                    handles.append(dist.broadcast(param.data, src=src, group=self.process_group,
                                                  async_op=True))
        return handles

    def _sync_params(self) -> None:
        """Every owner sends its shard to everyone (rank order, then group/bucket order)."""
        handles = []
        for rank in range(self.world_size):
            handles.extend(self._broadcast_params_from_rank(rank))
        for handle in handles:
            handle.wait()

    def _local_step(self, gradients: list[torch.Tensor | None] | None = None,
                    closure: Callable[[], float] | None = None, **kwargs: Any):
        """Step this rank's shard only (no communication besides Join's)."""
        Join.notify_join_context(self)
        mask = self._get_is_trainable_mask()
        if mask != self._is_trainable_mask:
            if self._overlap_with_ddp:
                raise RuntimeError(
                    "ZeroRedundancyOptimizer with `overlap_with_ddp=True` does not support "
                    "changing parameter trainability at run time"
                )
            logger.warning("trainable parameters changed since the last step; rebuilding buckets "
                           "(if parameters_as_bucket_view)")
            self._build_param_buckets()
            self._is_trainable_mask = mask

        # hyperparameters set on our groups (e.g. by an LR scheduler) reach the local optimizer
        self._sync_param_groups(self.param_groups, self.optim.param_groups)

        if gradients is None:
            if closure is None:
                loss = self.optim.step(**kwargs)
            else:
                loss = self.optim.step(closure=closure, **kwargs)
        else:
            if not self._overlap_with_ddp:
                raise AssertionError(
                    "Specifying `gradients` should not be used when `overlap_with_ddp=False`"
                )
            if closure is not None:
                raise AssertionError(
                    "`closure` is not supported when using a local functional optimizer"
                )
            loss = self.optim.step(gradients=gradients)

        # and whatever the local optimizer changed comes back
        self._sync_param_groups(self.optim.param_groups, self.param_groups)
        return loss

    def step(self, closure: Callable[[], float] | None = None, **kwargs: Any):
        """Step this rank's shard, then broadcast every shard from its owner. Extra keyword
        arguments go to the local optimizer's step. Returns the local optimizer's loss."""
        if self._overlap_with_ddp:
            logger.warning("step() does nothing with overlap_with_ddp=True: the DDP comm hook steps")
            return None
        loss = self._local_step(closure=closure, **kwargs)
        self._sync_params()
        return loss

    # -- Join ---------------------------------------------------------------

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook that lets a rank which ran out of inputs keep matching its peers' steps
        (it accepts no keyword arguments of its own)."""
        return _ZeROJoinHook(self)

    @property
    def join_device(self) -> torch.device:
        return self._default_device

    @property
    def join_process_group(self) -> Any:
        return self.process_group

    # -- state dicts --------------------------------------------------------

    def _check_overlap_initialized(self) -> None:
        if self._overlap_with_ddp and self._overlap_info.status != _OverlapStatus.INITIALIZED:
            raise RuntimeError(
                "This method should not be called until this ZeroRedundancyOptimizer instance "
                "has been fully initialized"
            )

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's local optimizer state on group rank `to` (collective: call it
        on every rank). state_dict() on `to` then returns the whole optimizer's state."""
        self._check_overlap_initialized()
        self._sync_param_groups(self.param_groups, self.optim.param_groups)

        cpu = torch.device("cpu")
        self._all_state_dicts = []
        for rank in range(self.world_size):
            if rank == to:
                if self.rank == to:
                    # own shard: no communication (tensors already on CPU are not copied)
                    self._all_state_dicts.append(_copy_to_device(self.optim.state_dict(), cpu))
                continue
            payload = [_copy_to_device(self.optim.state_dict(), cpu) if rank == self.rank else None]
            src = dist.distributed_c10d.get_global_rank(self.process_group, rank)
            # every rank takes part (broadcast, not gather, as torch does for NCCL's sake)
            dist.broadcast_object_list(payload, src=src, group=self.process_group)
            if self.rank == to:
                self._all_state_dicts.append(_copy_to_device(payload[0], cpu))

    def state_dict(self) -> dict[str, Any]:
        """The whole optimizer's state in torch.optim layout, as of the last
        consolidate_state_dict() that targeted this rank."""
        self._check_overlap_initialized()
        if len(self._all_state_dicts) == 0:
            raise RuntimeError(
                "Optimizer state has not been consolidated on this rank. Please call "
                f"`consolidate_state_dict(to={self.rank})` on all ranks beforehand if you meant "
                "to save the global state."
            )
        full = Optimizer.state_dict(self)
        partition = self._partition_parameters()
        for rank, local in enumerate(self._all_state_dicts):
            local_groups = local["param_groups"]
            global_groups = partition[rank]
            if len(local_groups) != len(global_groups):
                raise AssertionError("Mismatch between number of local and global parameter groups")
            for local_group, global_group in zip(local_groups, global_groups):
                local_ids = local_group["params"]
                params = global_group["params"]
                if len(local_ids) != len(params):
                    raise AssertionError(
                        "Mismatch between number of local and global parameters in parameter group"
                    )
                # local indices -> global indices
                for local_id, param in zip(local_ids, params):
                    if local_id in local["state"]:
                        full["state"][self._param_to_index[param]] = local["state"][local_id]
        full["state"] = dict(sorted(full["state"].items()))
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a whole-optimizer state dict (from state_dict(), torch's ZeRO or a plain
        optimizer); this rank keeps the state of the parameters it owns. As torch.optim (unlike
        torch's ZeRO) the dict replaces the whole state: an owned parameter it has no state for
        is left with none. `state_dict` is left unchanged and shares no tensor with this
        optimizer afterwards."""
        self._check_overlap_initialized()

        kept: dict[Any, Any] = {}  # what the wrapper's own state gets, as in torch
        local: dict[torch.Tensor, Any] = {}
        for index, value in state_dict["state"].items():
            param = self._index_to_param[index]
            if self._param_to_rank[param] != self.rank:
                kept[index] = None  # someone else's: not kept here
                continue
            kept[index] = value
            moved = _copy_to_device(value, param.device, clone=True)
            # scalars such as `step` stay on CPU whatever the parameter's device
            for name, item in moved.items():
                if torch.is_tensor(item) and item.dim() == 0:
                    moved[name] = item.cpu()
            local[param] = moved

        # validates group counts/sizes before changing anything
        Optimizer.load_state_dict(self, {**state_dict, "state": kept})
        # torch.optim semantics: the dict replaces the whole state, so a parameter it has no state
        # for loses what it had (a rollback to a checkpoint older than that state); torch's ZeRO
        # keeps it. Entries kept stay where they were, as in torch's update.
        for param in [p for p in self.optim.state if p not in local]:
            del self.optim.state[param]
        for param, value in local.items():
            self.optim.state[param] = value

        self._sync_param_groups(state_dict["param_groups"], self.param_groups)
        self._sync_param_groups(self.param_groups, self.optim.param_groups)

    # -- overlap_with_ddp ---------------------------------------------------

    def _init_zero_for_overlap(self) -> None:
        """Delayed set-up once DDP's buckets are known: partition, buffers, local optimizer."""
        if not self._overlap_with_ddp:
            raise AssertionError(
                "`_init_zero_for_overlap()` should only be called when `overlap_with_ddp=True`"
            )
        self._overlap_info.status = _OverlapStatus.INITIALIZED
        self._clear_cache()
        self._partition_parameters(self._overlap_info.params_per_rank)
        self._build_ddp_param_buckets()
        self._init_local_optimizer()

    def _get_assigned_rank(self, bucket_index: int) -> int:
        """Without shard_buckets, bucket i belongs wholly to rank i mod world_size."""
        if self._overlap_info.shard_buckets:
            raise AssertionError(
                "The bucket assignment requires global bucket information and will be computed "
                "later; there should be no need to use this method"
            )
        return bucket_index % self.world_size

    def _assign_bucket_subset_to_rank(self, bucket_index: int, bucket_params: list[torch.Tensor],
                                      bucket_offset: int, assigned_rank: int,
                                      assigned_ranks_per_bucket: list[set[int]]) -> None:
        info = self._overlap_info
        if len(bucket_params) == 0:
            raise ValueError("Empty bucket assignment")
        self._bucket_assignments_per_rank_cache[assigned_rank][bucket_index] = _DDPBucketAssignment(
            bucket_index, bucket_params, bucket_offset
        )
        if self.rank == assigned_rank:
            # where this bucket's parameters start in our local optimizer's list
            info.offsets[bucket_index] = len(info.params_per_rank[assigned_rank])
        info.params_per_rank[assigned_rank].extend(bucket_params)
        assigned_ranks_per_bucket[bucket_index].add(assigned_rank)
        info.num_bucket_assignments += 1

    @property
    def _bucket_assignments_per_rank(self) -> list[dict[int, _DDPBucketAssignment]]:
        """Per group rank: DDP bucket index -> the slice of that bucket the rank updates."""
        if not self._overlap_with_ddp:
            raise AssertionError(
                "`_bucket_assignments_per_rank` only be used if `overlap_with_ddp=True`"
            )
        if len(self._bucket_assignments_per_rank_cache) > 0:
            return self._bucket_assignments_per_rank_cache
        info = self._overlap_info
        if info.status != _OverlapStatus.INITIALIZED:
            raise AssertionError
        self._bucket_assignments_per_rank_cache = [{} for _ in range(self.world_size)]
        params_per_bucket = info.params_per_bucket
        info.assigned_ranks_per_bucket = [set() for _ in range(len(params_per_bucket))]
        assigned = info.assigned_ranks_per_bucket

        if not info.shard_buckets:
            for bucket_index, bucket_params in enumerate(params_per_bucket):
                if len(bucket_params) <= 0:
                    raise AssertionError("Empty bucket")
                self._assign_bucket_subset_to_rank(
                    bucket_index, bucket_params, 0, self._get_assigned_rank(bucket_index), assigned
                )
            return self._bucket_assignments_per_rank_cache

        # Sharded buckets: smallest bucket first; cut a bucket into consecutive slices of
        # under total/world_size elements, each slice to the least-loaded rank that has no
        # slice of this bucket yet.
        if info.total_size is None:
            raise AssertionError("`total_size` was not computed")
        threshold = info.total_size / self.world_size
        load = [0] * self.world_size
        by_size = sorted(enumerate(params_per_bucket), key=lambda item: sum(p.numel() for p in item[1]))
        for bucket_index, bucket_params in by_size:
            if len(bucket_params) <= 0:
                raise AssertionError("Empty bucket")
            start = 0
            running = 0
            for i, param in enumerate(bucket_params):
                numel = param.numel()
                if running + numel >= threshold and i > start:
                    owner = self._get_min_index(load, assigned[bucket_index])
                    self._assign_bucket_subset_to_rank(
                        bucket_index, bucket_params[start:i], start, owner, assigned
                    )
                    load[owner] += running
                    start = i
                    running = 0
                running += numel
            # the tail of the bucket (never merged with another bucket)
            owner = self._get_min_index(load, assigned[bucket_index])
            self._assign_bucket_subset_to_rank(
                bucket_index, bucket_params[start:], start, owner, assigned
            )
            load[owner] += running
        return self._bucket_assignments_per_rank_cache


# ---------------------------------------------------------------------------
# DDP communication hooks that run the ZeRO step inside the backward pass
# ---------------------------------------------------------------------------

def _perform_local_step(bucket: dist.GradBucket, zero: ZeroRedundancyOptimizer, rank: int) -> None:
    """Step the parameters of `bucket` that `rank` owns, with the bucket's (reduced) grads."""
    info = zero._overlap_info
    bucket_index = bucket.index()
    if len(zero.optim.param_groups) != 1:
        raise AssertionError("Overlapping DDP with ZeRO only supports a single parameter group")
    # None = leave that parameter alone this time
    gradients: list[torch.Tensor | None] = [None] * len(zero.optim.param_groups[0]["params"])
    if bucket_index not in info.offsets:
        raise AssertionError(f"Bucket index {bucket_index} was not assigned to rank {rank}")
    first = info.offsets[bucket_index]
    assignment = zero._bucket_assignments_per_rank[rank][bucket_index]
    grads = bucket.gradients()[assignment.offset: assignment.offset + len(assignment.parameters)]
    for i, grad in enumerate(grads):
        gradients[first + i] = grad
    zero._local_step(gradients)


def _broadcast_bucket(bucket_index: int, zero: ZeroRedundancyOptimizer) -> None:
    """Start broadcasting every owner's slice of bucket `bucket_index` (owners in rank order)."""
    info = zero._overlap_info
    if len(info.assigned_ranks_per_bucket) <= bucket_index:
        raise AssertionError("`assigned_ranks_per_bucket` is not fully constructed")
    owners = sorted(info.assigned_ranks_per_bucket[bucket_index])  # same order on all ranks
    if len(owners) <= 0:
        raise AssertionError(f"Bucket {bucket_index} should be assigned to at least one rank")
    for owner in owners:
        assignments = zero._bucket_assignments_per_rank[owner]
        if bucket_index in assignments:
            tensor = assignments[bucket_index].tensor
            if tensor is None:
                raise AssertionError
            info.broadcast_handles.append(dist.broadcast(
                tensor, src=dist.get_global_rank(zero.process_group, owner),
                group=zero.process_group, async_op=True,
            ))


def _save_ddp_bucket_info(bucket: dist.GradBucket, zero: ZeroRedundancyOptimizer) -> None:
    """Record one rebuilt DDP bucket's parameters (and size, when sharding buckets)."""
    info = zero._overlap_info
    params = bucket.parameters()
    if len(params) <= 0:
        raise AssertionError("Empty bucket")
    info.params_per_bucket.append(params)
    if info.shard_buckets:
        if info.total_size is None:
            raise AssertionError
        info.total_size += sum(p.numel() for p in params)


def _hook_with_zero_step_setup(ddp_ref: weakref.ReferenceType, zero: ZeroRedundancyOptimizer,
                               bucket: dist.GradBucket) -> None:
    """Drive the delayed initialisation: wait for DDP's bucket rebuild, record the buckets
    during the next backward, initialise ZeRO on the following one."""
    if not ddp_ref()._has_rebuilt_buckets:
        if zero._overlap_info.status != _OverlapStatus.UNINITIALIZED:
            raise AssertionError
        return
    info = zero._overlap_info
    if info.status == _OverlapStatus.UNINITIALIZED:
        info.status = _OverlapStatus.DDP_HAS_REBUILT_BUCKETS
    if info.status == _OverlapStatus.DDP_HAS_REBUILT_BUCKETS:
        if bucket.index() == 0 and len(info.params_per_bucket) > 0:
            # first bucket of the backward after the recording one: everything is known
            zero._init_zero_for_overlap()
        else:
            _save_ddp_bucket_info(bucket, zero)


def _check_hook_arguments(ddp, zero: ZeroRedundancyOptimizer, shard_buckets: bool) -> weakref.ReferenceType:
    if not zero._overlap_with_ddp:
        raise ValueError(
            "ZeroRedundancyOptimizer must be constructed with `overlap_with_ddp=True` to use "
            "this hook properly"
        )
    ddp_ref = weakref.ref(ddp)
    # async broadcasts issued from inside a Gloo comm hook can deadlock (pytorch issue 62300)
    if dist.get_backend(ddp.process_group) == dist.Backend.GLOO:
        raise RuntimeError("Gloo backend using Overlapping DDP with ZeRO may meet hangs")
    if shard_buckets:
        zero._overlap_info.shard_buckets = True
        zero._overlap_info.total_size = 0
    return ddp_ref


def hook_with_zero_step(hook: Callable[[Any, dist.GradBucket], torch.futures.Future], ddp,
                        zero: ZeroRedundancyOptimizer, shard_buckets: bool = False):
    """Wrap DDP comm hook `hook` so that, once the last bucket's gradients are computed, each
    rank steps its shard (waiting on each owned bucket's all-reduce) and the shards are
    broadcast. `zero` must use overlap_with_ddp=True; NCCL only (Gloo is refused). The first
    two (three with static_graph) iterations only record DDP's bucketing and update nothing.
    shard_buckets=True lets one bucket be split among several ranks."""
    ddp_ref = _check_hook_arguments(ddp, zero, shard_buckets)

    def hook_with_zero_fn(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        fut = hook(state, bucket)
        _hook_with_zero_step_setup(ddp_ref, zero, bucket)
        info = zero._overlap_info
        if info.status != _OverlapStatus.INITIALIZED:
            return fut

        bucket_index = bucket.index()
        rank = zero.rank
        if len(info.assigned_ranks_per_bucket) <= bucket_index:
            raise AssertionError("`assigned_ranks_per_bucket` is not fully constructed")
        if rank in info.assigned_ranks_per_bucket[bucket_index]:
            info.bucket_index_to_bucket[bucket_index] = bucket
            info.bucket_index_to_future[bucket_index] = fut

        # buckets must arrive 0, 1, 2, ... in autograd order
        if info.bucket_indices_seen:
            if info.bucket_indices_seen[-1] != bucket_index - 1:
                raise AssertionError("Bucket indices are not in incremental order")
        elif bucket_index != 0:
            raise AssertionError("Bucket indices do not start from 0")
        info.bucket_indices_seen.append(bucket_index)

        num_buckets = len(info.params_per_bucket)
        if bucket_index != num_buckets - 1:
            return fut

        # Last bucket: step everything now rather than as a callback of the last all-reduce,
        # which would hold every bucket's step back until that one finished.
        for index in range(num_buckets):
            if rank in info.assigned_ranks_per_bucket[index]:
                if index not in info.bucket_index_to_future:
                    raise AssertionError(
                        f"All-reduce future for bucket {index} not saved on rank {rank}"
                    )
                info.bucket_index_to_future[index].wait()
                _perform_local_step(info.bucket_index_to_bucket[index], zero, rank)
            _broadcast_bucket(index, zero)
        # parameters must be final before the next forward
        info.wait_for_broadcasts()
        info.clear_per_iter_info()
        return fut

    return hook_with_zero_fn


def hook_with_zero_step_interleaved(hook: Callable[[Any, dist.GradBucket], torch.futures.Future],
                                    ddp, zero: ZeroRedundancyOptimizer, shard_buckets: bool = False):
    """Like hook_with_zero_step, but each bucket's partial step (and its broadcasts) is chained
    on that bucket's all-reduce, interleaving optimizer work with the backward pass."""
    ddp_ref = _check_hook_arguments(ddp, zero, shard_buckets)

    def hook_with_zero_interleaved_fn(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        fut = hook(state, bucket)
        _hook_with_zero_step_setup(ddp_ref, zero, bucket)
        if zero._overlap_info.status != _OverlapStatus.INITIALIZED:
            return fut

        def zero_step(reduced: torch.futures.Future) -> torch.Tensor:
            info = zero._overlap_info
            bucket_index = bucket.index()
            rank = zero.rank
            info.bucket_indices_seen.append(bucket_index)
            if rank in info.assigned_ranks_per_bucket[bucket_index]:
                _perform_local_step(bucket, zero, rank)
            _broadcast_bucket(bucket_index, zero)
            if len(info.bucket_indices_seen) == len(info.params_per_bucket):
                info.wait_for_broadcasts()
                info.clear_per_iter_info()
            return bucket.buffer()

        return fut.then(zero_step)

    return hook_with_zero_interleaved_fn
