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


def test_fused_adam_differs_from_forloop():
    rows = ch.compare_paths("Adam", {}, torch.float32, ["forloop", "foreach", "fused"], numel=4096, steps=4)
    fused = _row(rows, "fused vs forloop")
    assert fused["identical"] is False and fused["first_step"] == 1
    assert fused["max_ulp"] > 0 and 0 < fused["max_abs"] < 1e-4 and fused["tensor"] is not None
    assert _row(rows, "foreach vs forloop")["identical"]


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
