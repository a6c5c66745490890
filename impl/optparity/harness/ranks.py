"""A pool of long-lived ranks for multi-process tests.

Spawning a process group costs seconds; a suite that spawns one per assertion takes hours on
two cores. A RankPool starts `world_size` processes once, joins them into one torch.distributed
process group (Gloo on CPU, NCCL when every rank has a GPU), and then runs any number of
module-level functions `fn(rank, world_size, *args)` on all ranks.

Faults end a call fast and loudly: a rank that raises comes back as RankError with that rank's
traceback; a rank that dies, or does not answer within `timeout`, tears the pool down (no orphan
processes) and raises RankError naming the rank and what it was running.

Under torchrun (RANK / WORLD_SIZE in the environment) there is nothing to spawn: `InProcessRanks`
runs the function on this process's rank, so the same tests run across machines.
"""
from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


_GRACE_SECONDS = 2.0
_COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                               "distbackenderror", "broken pipe")


def _is_collective_failure(tb: str) -> bool:
    last = _last_line(tb).lower()
    return any(m in last for m in _COLLECTIVE_FAILURE_MARKERS)


def _last_line(tb: str) -> str:
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def _collective_site(tb: str) -> str:
    """The last frame outside torch: where the user's code entered the collective."""
    frames = [ln.strip() for ln in tb.splitlines() if ln.strip().startswith("File ")]
    user = [f for f in frames if "/torch/" not in f and "harness/ranks.py" not in f]
    return user[-1] if user else (frames[-1] if frames else "?")


class RankError(RuntimeError):
    """Something went wrong on a rank; the message names the rank."""


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(fn: Callable) -> str:
    return f"{fn.__module__}.{getattr(fn, '__qualname__', fn)}"


def _worker(rank: int, world_size: int, backend: str, port: int, collective_timeout: float,
            tasks, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # world_size ranks share two cores; keep timings sane
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=collective_timeout))
        results.put((rank, "ready", None))
    except Exception:  # noqa: BLE001
        results.put((rank, "error", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        call_id, fn, args, kwargs = task
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((rank, "ok", (call_id, value)))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            results.put((rank, "error", (call_id, traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    """`world_size` spawned ranks in one process group, reused across calls."""

    def __init__(self, world_size: int, backend: str | None = None, timeout: float = 60.0,
                 collective_timeout: float = 20.0, start_method: str = "spawn"):
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend or backend_for_device()
        if self.backend == "nccl" and torch.cuda.device_count() < 1:
            raise RankError("NCCL needs CUDA devices and this machine has none")
        self.timeout = timeout
        self.collective_timeout = collective_timeout
        self._calls = 0
        # "fork" skips each rank's torch import (seconds per rank); only for a parent that has not
        # started CUDA or OpenMP threads (harness/distributed/engine.py checks that first)
        self.start_method = start_method
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context(self.start_method)
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        port = _free_port()
        self._procs = []
        for rank in range(self.world_size):
            p = ctx.Process(target=_worker, daemon=True,
                            args=(rank, self.world_size, self.backend, port, self.collective_timeout,
                                  self._tasks[rank], self._results))
            p.start()
            self._procs.append(p)
        ready = self._collect("ready", "joining the process group", None, self.timeout + 60)
        assert len(ready) == self.world_size

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """fn(rank, world_size, *args, **kwargs) on every rank; the per-rank return values."""
        if not self.alive:
            raise RankError("the rank pool is closed (an earlier call failed); start a new one")
        self._calls += 1
        call_id = self._calls
        for q in self._tasks:
            q.put((call_id, fn, args, kwargs))
        return self._collect("ok", _describe(fn), call_id, timeout or self.timeout)

    def _collect(self, expected: str, what: str, call_id, timeout: float) -> list[Any]:
        values: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(values) + len(errors) < self.world_size:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in values]
            if dead or time.monotonic() > deadline:
                break
            try:
                rank, status, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                continue
            if status == "error":
                errors[rank] = payload[1] if isinstance(payload, tuple) else payload
                # Give peers a moment to report or die too, so the root cause can be named.
                deadline = min(deadline, time.monotonic() + _GRACE_SECONDS)
            elif expected == "ok":
                got_id, value = payload
                if got_id == call_id:  # else a stale answer from an abandoned call
                    values[rank] = value
            else:
                values[rank] = payload
        if len(values) == self.world_size:
            return [values[r] for r in range(self.world_size)]
        message = self._diagnose(what, timeout, values, errors)
        self.close()  # peers of a failed rank may hang in a collective: never reuse this group
        raise RankError(message)

    def _diagnose(self, what: str, timeout: float, values: dict, errors: dict[int, str]) -> str:
        """Name the rank that caused the failure: a dead rank, else one that raised a non-collective
        error, else one that never answered (hung), else the first collective error."""
        dead = {r: p.exitcode for r, p in enumerate(self._procs) if not p.is_alive() and r not in values}
        silent = sorted(set(range(self.world_size)) - set(values) - set(errors) - set(dead))
        peers = "".join(f"\n  rank {r}: {_last_line(tb)} (at {_collective_site(tb)})" for r, tb in sorted(errors.items()))
        if dead:
            r = min(dead)
            return f"rank {r} died (exit code {dead[r]}) while running {what}" + (f"; peers failed:{peers}" if errors else "")
        own = [r for r, tb in errors.items() if not _is_collective_failure(tb)]
        if own:
            r = min(own)
            return f"rank {r} raised while running {what}:\n{errors[r]}"
        if silent:
            head = f"rank {silent[0]} hung in {what} (stuck ranks: {silent}; no answer"
            if errors:
                return head + f"); its peers timed out waiting in a collective:{peers}"
            return head + f" within {timeout:.0f} s)"
        r = min(errors)
        return f"rank {r} failed in a collective while running {what}:\n{errors[r]}"

    def close(self) -> None:
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001
                    pass
        deadline = time.monotonic() + 3
        for p in self._procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcessRanks:
    """This process is one rank of a job started by torchrun: run fn here, for this rank only."""

    def __init__(self):
        if not dist.is_initialized():
            backend = backend_for_device()
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        self.world_size = dist.get_world_size()
        self.backend = dist.get_backend()
        self.alive = True

    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        rank = dist.get_rank()
        value = fn(rank, self.world_size, *args, **kwargs)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        pass


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
