"""torch's own optimizer test configurations, read from the installed torch.

The matrix's configurations (harness/algorithms/<algo>.py, `torch_configs`) are torch
MIRRORS_TORCH's (tests/test_matrix.py proves they are the installed torch's on that release). On
another release torch's tests may have gained configurations: configs_added_by_installed_torch()
reads them from torch.testing._internal.common_optimizers.optim_db and the matrix runs the new ones
after its own (case ids of the existing configurations stay the same, so goldens still compare).

That module is private and heavy: it needs expecttest, freezes torch.backends' global flags and may
initialise CUDA when imported, which would break the check's forked workers. So it is read in a
child process, once per installed torch (cached under $XDG_CACHE_HOME/optparity), and only when
the installed release is not the mirrored one. When it cannot be read the reason is kept and
reported (note()), never raised: the matrix then holds the mirrored release's configurations.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from optparity import versions

# Runs in a child: {algorithm: {"cpu": [kwargs...], "cuda": [kwargs...]}} for every optim_db entry.
_READER = """
import sys, torch
import torch.testing._internal.common_optimizers as common
out = {}
for entry in common.optim_db:
    out[entry.optim_cls.__name__] = {dev: [i.kwargs for i in entry.optim_inputs_func(dev, None)]
                                     for dev in ("cpu", "cuda")}
torch.save(out, sys.argv[1])
"""


def _cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optparity"
    return base / f"torch-test-configs-{torch.__version__}.pt"


@functools.cache
def _read() -> tuple[dict | None, str | None]:
    """(configurations per algorithm and device, None) or (None, why they could not be read)."""
    cache = _cache_file()
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=False), None
        except Exception:  # noqa: BLE001 - a stale or torn cache is read again below
            pass
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "configs.pt"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # its import must not touch a GPU either
        try:
            done = subprocess.run([sys.executable, "-c", _READER, str(target)], capture_output=True, text=True,
                                  timeout=600, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"reading torch.testing._internal.common_optimizers failed: {e}"
        if done.returncode != 0 or not target.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"torch.testing._internal.common_optimizers could not be read ({last})"
        configs = torch.load(target, weights_only=False)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(configs, cache)
    except OSError:
        pass  # read-only home: read again next time
    return configs, None


def installed_configs(algo: str, device: str = "cpu") -> list[dict] | None:
    """torch's test configurations of `algo` on `device` ("cpu"/"cuda") from the installed torch;
    None when they cannot be read (reason()) or torch's tests do not know `algo`."""
    configs, _ = _read()
    if configs is None or algo not in configs:
        return None
    return configs[algo][device]


def reason() -> str | None:
    """Why the installed torch's test configurations could not be read (None: they could)."""
    return _read()[1]


def configs_added_by_installed_torch(algo: str, device: str, known: list[dict]) -> list[dict]:
    """The installed torch's test configurations that `known` lacks, in torch's order. Empty on
    the mirrored release (its list is the description's, proven by tests/test_matrix.py) and when
    they cannot be read (note() says so)."""
    if versions.mirrors_installed() or os.environ.get("OPTPARITY_TORCH_CONFIGS") == "mirrored":
        return []
    from optparity.harness.matrix import same_config

    theirs = installed_configs(algo, device) or []
    added: list[dict] = []
    for config in theirs:
        if not any(same_config(config, k) for k in known + added):
            added.append(config)
    return added


def note() -> str | None:
    """A line for the summary when the installed torch is not the mirrored one: where the
    configurations came from."""
    if versions.mirrors_installed() or os.environ.get("OPTPARITY_TORCH_CONFIGS") == "mirrored":
        return None
    why = reason()
    if why:
        return (f"torch's test configurations: {why}; the matrix holds torch {versions.MIRRORS_TORCH}'s "
                f"(install expecttest to read torch {torch.__version__}'s)")
    from optparity.harness.algorithms import SPECS

    added = {algo: len(configs_added_by_installed_torch(algo, "cpu", spec.configs())) for algo, spec in SPECS.items()}
    added = {algo: n for algo, n in added.items() if n}
    if not added:
        return (f"torch's test configurations: read from torch {torch.__version__}, none beyond torch "
                f"{versions.MIRRORS_TORCH}'s")
    return (f"torch's test configurations: read from torch {torch.__version__}, {sum(added.values())} beyond torch "
            f"{versions.MIRRORS_TORCH}'s, run after them: " + ", ".join(f"{a} {n}" for a, n in added.items()))
