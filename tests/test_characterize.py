"""The numerics map: exact distances, 0 for torch paths known to be bit-identical, not 0 for ones
known to differ, and the files it writes."""
from __future__ import annotations

import random
import struct

import pandas as pd
import pytest
import torch

from optparity.cli import main
from optparity.harness import characterize as ch


def _ordered_py(x: float) -> int:
    bits = struct.unpack("<q", struct.pack("<d", x))[0]
    magnitude = bits & ((1 << 63) - 1)
    return -magnitude - 1 if bits < 0 else magnitude


def test_max_ulp_is_exact_for_float64_across_signs():
    rng = random.Random(3)
    for _ in range(50):
        a = [rng.choice((1, -1)) * 10 ** rng.uniform(-300, 300) for _ in range(40)]
        b = [rng.choice((1, -1)) * 10 ** rng.uniform(-300, 300) for _ in range(40)]
        expected = max(abs(_ordered_py(x) - _ordered_py(y)) for x, y in zip(a, b))
        assert ch.max_ulp(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)) == expected
    inf = torch.tensor([float("inf")], dtype=torch.float64)
    assert ch.max_ulp(inf, -inf) == 2 * 0x7FF0000000000000 + 1  # beyond int64: no overflow
    assert ch.max_ulp(torch.tensor([0.0]), torch.tensor([-0.0])) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_distance_of_neighbours(dtype):
    x = torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    y = torch.nextafter(x, torch.full_like(x, 10.0))
    d = ch.distance(y, x)
    assert not d["identical"] and d["max_ulp"] == 1
    assert d["max_abs"] == pytest.approx(float((y.double() - x.double()).abs().max()))
    assert ch.distance(x, x.clone()) == {"identical": True, "max_ulp": 0, "max_abs": 0.0, "max_rel": 0.0,
                                         "nan_mismatch": 0}
    nan = torch.tensor([float("nan"), 1.0], dtype=dtype)
    assert ch.distance(nan, nan.clone())["identical"]
    assert ch.distance(nan, torch.tensor([1.0, 1.0], dtype=dtype))["nan_mismatch"] == 1


def _row(rows, pair):
    (row,) = [r for r in rows if r["pair"] == pair]
    return row


def test_identical_paths_measure_zero():
    # SGD without momentum: p.add_(grad, alpha=-lr) on both for-loop and foreach (checked: identical).
    rows = ch.compare_paths("SGD", {}, torch.float32, ["forloop", "foreach"], numel=4096, steps=4)
    row = _row(rows, "foreach vs forloop")
    assert row["identical"] and row["first_step"] is None
    assert (row["max_ulp"], row["max_abs"], row["max_rel"]) == (0, 0.0, 0.0)


def _first_differing_step(a, b):
    """Independently of compare_paths: the first step (1-based) at which any tensor's bits differ."""
    for k, (sa, sb) in enumerate(zip(a, b), 1):
        if any(not torch.equal(sa[n].view(torch.int32), sb[n].view(torch.int32)) for n in sa):
            return k
    return None


def test_fused_adam_against_forloop_is_measured_on_this_machine():
    # Whether torch's fused CPU Adam equals its for-loop path depends on the CPU: on AVX2 machines
    # they part at step 1 (a few ULPs), on AVX512 ones they can be bit-identical. So the row is
    # checked against this machine's own measurement, and each outcome's numbers must agree with it.
    rows = ch.compare_paths("Adam", {}, torch.float32, ["forloop", "foreach", "fused"], numel=4096, steps=4)
    fused = _row(rows, "fused vs forloop")
    runs = {p: list(ch.run_path("Adam", {}, torch.float32, p, 4096, 4)) for p in ("forloop", "fused")}
    first = _first_differing_step(runs["fused"], runs["forloop"])
    capability = torch.backends.cpu.get_cpu_capability()
    assert fused["first_step"] == first, capability
    if first is None:
        assert fused["identical"] is True and (fused["max_ulp"], fused["max_abs"], fused["tensor"]) == (0, 0.0, None)
    else:
        assert fused["identical"] is False and fused["max_ulp"] > 0 and fused["tensor"] is not None
        assert 0 < fused["max_abs"] < 1e-4, capability  # rounding-level, not different math
    assert _row(rows, "foreach vs forloop")["identical"]


def test_a_differing_path_is_measured_from_its_first_step(monkeypatch):
    # A path that differs on every machine: the for-loop path with its first parameter nudged by one
    # ULP after each step. The row must say "differs", from step 1, by at least one ULP.
    real = ch.run_path

    def nudged(algo, options, dtype, path, numel, steps):
        for state in real(algo, options, dtype, "forloop" if path == "foreach" else path, numel, steps):
            if path == "foreach":
                name = next(iter(state))
                state = {**state, name: torch.nextafter(state[name], torch.full_like(state[name], float("inf")))}
            yield state

    monkeypatch.setattr(ch, "run_path", nudged)
    row = _row(ch.compare_paths("Adam", {}, torch.float32, ["forloop", "foreach"], numel=256, steps=3),
               "foreach vs forloop")
    assert row["identical"] is False and row["first_step"] == 1 and row["max_ulp"] >= 1 and row["tensor"]


@pytest.mark.cuda  # runs everywhere; on a GPU (scripts/gpu-check.sh) the CUDA path must run
def test_a_refused_path_is_an_error_row_not_a_crash():
    rows = ch.compare_paths("Adam", {"amsgrad": True}, torch.float32, ["forloop", "cuda-forloop"], numel=16, steps=1)
    row = _row(rows, "cuda-forloop vs forloop")
    if torch.cuda.is_available():
        assert row["error"] is None
    else:
        assert row["error"].startswith("cuda-forloop: ") and row["identical"] is None


def test_paths_follow_the_algorithm_description():
    assert ch.available_paths("Adam", cuda=False) == ["forloop", "foreach", "fused", "compiled"]
    assert ch.available_paths("Adadelta", cuda=False) == ["forloop", "foreach", "compiled"]
    assert "cuda-fused" in ch.available_paths("Adam", cuda=True)
    assert ch.pairs(["forloop", "foreach", "fused", "compiled"]) == [
        ("foreach", "forloop"), ("fused", "forloop"), ("compiled", "forloop"), ("fused", "foreach")]


def test_command_writes_table_heat_map_and_index(tmp_path, capsys):
    code = main(["characterize", "--algorithms", "SGD,Adam", "--dtypes", "float32,bfloat16", "--steps", "3",
                 "--numel", "2048", "--no-compile", "--out", str(tmp_path), "-q"])
    assert code == 0
    assert {p.name for p in tmp_path.iterdir()} == {"numerics.csv", "numerics.md", "numerics.png", "index.html"}
    table = pd.read_csv(tmp_path / "numerics.csv")
    assert set(table["algorithm"]) == {"SGD", "Adam"} and "compiled vs forloop" not in set(table["pair"])
    sgd = table[(table["algorithm"] == "SGD") & (table["options"] == "defaults") & (table["dtype"] == "float32")]
    assert sgd["identical"].all() and (sgd["max_ulp"] == 0).all()
    assert "numerics.png" in (tmp_path / "index.html").read_text()
    assert "| Adam" in (tmp_path / "numerics.md").read_text()
    assert "fused vs forloop" in capsys.readouterr().out
