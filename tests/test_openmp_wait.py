"""optparity asks OpenMP for passive waiting before torch loads it (optparity/__init__.py): a case
on two threads beside other work otherwise spins on descheduled threads for minutes and reads hung."""
from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import optparity, os, sys; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy(argv_tail=(), **env):
    full = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", PROBE, *argv_tail], env=full, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_passive_wait_is_asked_before_torch_loads():
    assert _policy() == "PASSIVE"


def test_a_users_own_setting_wins():
    assert _policy(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"


def test_bench_keeps_torchs_default():
    assert _policy(("bench",)) == "None"


def test_torch_loaded_first_is_left_alone():
    out = subprocess.run([sys.executable, "-c", "import torch; " + PROBE], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"})
    assert out.stdout.strip() == "None"
