"""optparity asks OpenMP for a short spin before a waiting thread sleeps, before torch loads it
(optparity/__init__.py): a case on two threads beside other work otherwise spins on descheduled
threads for minutes and reads hung, and fully passive waiting pays a wake-up per parallel region."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import optparity, os, sys; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
OURS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def _clean() -> dict:
    return {k: v for k, v in os.environ.items() if k not in OURS}


def _settings(argv_tail=(), prefix="", **env):
    out = subprocess.run([sys.executable, "-c", prefix + PROBE, *argv_tail], env=_clean() | env,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_a_short_spin_is_asked_before_torch_loads():
    assert _settings() == ["1000", "None"]


def test_a_users_own_setting_wins():
    assert _settings(OMP_WAIT_POLICY="ACTIVE") == ["None", "ACTIVE"]
    assert _settings(GOMP_SPINCOUNT="5") == ["5", "None"]


def test_bench_keeps_torchs_default():
    assert _settings(("bench",)) == ["None", "None"]


def test_torch_loaded_first_is_left_alone():
    assert _settings(prefix="import torch; ") == ["None", "None"]
