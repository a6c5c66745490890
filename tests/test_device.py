"""check --device / --reference-device (issue 9, item 4).

Without a GPU: every CUDA request exits 2 (CLI) or raises UsageError (check.prepare) before any
case runs; the CUDA matrix is still built and inspected (paths, configurations, ids, seeds), the
layout-preserving moves are proven on the "meta" device, and the cross-device verdict is proven
with the reference on "cpu:0" (another device string, the same CPU). With a GPU the tests marked
`needs_cuda` run the CUDA matrix for real."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from optparity.harness import levels, matrix, params
from optparity.harness.algorithms import ALGORITHMS, SPECS
from optparity.harness.check import UsageError, prepare, run
from optparity.harness.runner import Verdict

HAS_CUDA = torch.cuda.is_available()
def needs_cuda(test):
    """Marked `cuda` (scripts/gpu-check.sh selects them) and skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA; this machine has no GPU")(test))
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: the no-GPU refusal cannot show")


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "optparity", "check", *args], capture_output=True, text=True,
                          timeout=timeout)


# --- refusals: exit 2 / UsageError, before any case runs ------------------------------------------

@no_cuda
def test_cli_cuda_without_a_gpu_exits_2():
    out = _cli("--candidate", "optparity.optim:Adam", "--level", "quick", "-q", "--device", "cuda")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False" in out.stderr
    assert out.stdout == ""  # no summary: nothing ran


@pytest.mark.parametrize("device, says", [
    ("cuda:99", "cuda:99: "),  # no GPU: none at all; a GPU machine: no such index
    ("tpu", "not a device; expected cpu, cuda or cuda:N"),
])
def test_cli_unusable_device_exits_2(device, says):
    out = _cli("--candidate", "optparity.optim:Adam", "-q", "--reference-device", device)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"--reference-device {device}" in out.stderr and says in out.stderr
    assert out.stdout == ""


def test_cli_golden_is_refused_off_the_cpu():
    out = _cli("--candidate", "optparity.optim:Adam", "--device", "cuda", "--golden")
    assert out.returncode == 2 and "recorded fingerprints are of CPU runs" in out.stderr


@no_cuda
@pytest.mark.parametrize("kwargs", [{"device": "cuda"}, {"device": "cuda:0"}, {"reference_device": "cuda"},
                                    {"device": "cpu", "reference_device": "cuda:1"}])
def test_prepare_cuda_without_a_gpu_raises(kwargs):
    with pytest.raises(UsageError, match=r"this machine has no CUDA device \(torch.cuda.is_available\(\) is False"):
        prepare("optparity.optim:Adam", level="quick", **kwargs)


@pytest.mark.parametrize("device, says", [
    ("cuda:99", "cuda:99: "), ("tpu", "not a device; expected cpu, cuda or cuda:N"), ("cuda:x", "not a device"),
    ("mps", "only cpu and cuda[:N] are supported, not mps"), ("meta", "not meta"), ("cpu:1", "there is one CPU device"),
])
def test_prepare_unusable_device_raises(device, says):
    with pytest.raises(UsageError, match=f"--device {device}: ") as got:
        prepare("optparity.optim:Adam", level="quick", device=device)
    assert says in str(got.value)


def test_prepare_refuses_before_loading_the_candidate():
    # a device error wins over a candidate that does not even import: nothing is loaded first
    with pytest.raises(UsageError, match="--device tpu"):
        prepare("no_such_module_anywhere:Adam", device="tpu")


# --- the CPU is what it always was ----------------------------------------------------------------

@pytest.mark.parametrize("algo", ["Adam", "LBFGS"])
def test_cpu_cases_are_unchanged(algo):
    before = levels.select("quick", algo)
    for plan in (prepare(f"optparity.optim:{algo}", level="quick"),
                 prepare(f"optparity.optim:{algo}", level="quick", device="cpu"),
                 prepare(f"optparity.optim:{algo}", level="quick", device="cpu", reference_device="cpu")):
        assert [(c.id, c.seed) for c in plan.cases] == [(c.id, c.seed) for c in before]
    assert all("@" not in c.id and c.device == "cpu" and not c.across_devices for c in before)


# --- the CUDA matrix, built without a GPU ---------------------------------------------------------

def _cuda_cases(algos=ALGORITHMS, **kw):
    return matrix.build_cases(algos, device="cuda", **kw)


def test_cuda_matrix_paths_configs_ids_and_seeds():
    cpu = {c.id: c for c in matrix.build_cases()}
    cuda = _cuda_cases()
    assert all(c.device == "cuda" and c.id.endswith("@cuda") and not c.across_devices for c in cuda)
    assert len({c.id for c in cuda}) == len(cuda)
    assert {c.algorithm for c in cuda if c.path == "fused"} == {n for n, s in SPECS.items() if s.fused_on_cuda}
    for c in cuda:  # the same case on the CPU has the same seed: both start from the same numbers
        twin = cpu.get(c.id[:-len("@cuda")])
        if twin is not None:
            assert twin.seed == c.seed
    capturable = [c for c in cuda if c.config.get("capturable")]
    assert {c.algorithm for c in capturable} >= {n for n, s in SPECS.items() if s.cuda_configs}
    cuda_only = [c for c in capturable if c.id[:-len("@cuda")] not in cpu]
    assert cuda_only and all(c.config_index >= len(SPECS[c.algorithm].configs()) for c in cuda_only)


def test_quick_cuda_level_has_fused_and_capturable_cases():
    cases = levels.select("quick", "Adam", device="cuda")
    assert {"forloop", "foreach", "fused", "default"} <= {c.path for c in cases}
    assert any(c.path == "fused" and c.config.get("capturable") for c in cases)
    assert len(cases) > len(levels.select("quick", "Adam"))  # the CUDA-only configurations


def test_cross_device_matrix_keeps_what_both_devices_have():
    cases = _cuda_cases(["Adam", "ASGD"], reference_device="cpu")
    assert cases and all(c.across_devices and c.id.endswith("@cuda,reference=cpu") for c in cases)
    # torch refuses capturable on the CPU: capturable configurations are left out (CUDA-only ones too)
    assert not any(c.config.get("capturable") for c in cases)
    assert max(c.config_index for c in cases if c.algorithm == "ASGD") < len(SPECS["ASGD"].configs())
    assert {c.path for c in cases if c.algorithm == "Adam"} >= {"fused"}


def test_torch_cuda_only_configs_are_in_the_cuda_matrix():
    common = pytest.importorskip("torch.testing._internal.common_optimizers",
                                 reason="torch's test helpers need expecttest")
    for entry in common.optim_db:
        algo = entry.optim_cls.__name__
        if algo not in ALGORITHMS:
            continue
        ours = matrix.configs(algo, "cuda")
        missing = [k.kwargs for k in entry.optim_inputs_func("cuda", None)
                   if not any(matrix.same_config(k.kwargs, c) for c in ours)]
        assert not missing, f"torch tests {algo} on CUDA with {missing}, our CUDA matrix does not"


# --- parameters and gradients move with their layout ----------------------------------------------

@pytest.mark.parametrize("param_set", ["mixed", "groups", "complex", "sparse", "layouts", "values", "dtype_mix",
                                       "matrix_groups", "sparse_grads"])
@pytest.mark.parametrize("differentiable", [False, True])
def test_sets_move_with_strides_offsets_and_leafness(param_set, differentiable):
    # "meta" holds no values but every layout fact: what a move to CUDA keeps, checked on any machine
    here = params.make_params(param_set, torch.float32, 7, {"lr": 0.1}, differentiable=differentiable)
    there = params.make_params(param_set, torch.float32, 7, {"lr": 0.1}, differentiable=differentiable,
                               device="meta")
    assert there.device == "meta" and there.names == here.names and there.groups == here.groups
    for a, b in zip(there.params, here.params):
        assert a.device.type == "meta"
        assert (a.shape, a.stride(), a.dtype, a.requires_grad, a.is_leaf) == (b.shape, b.stride(), b.dtype,
                                                                              b.requires_grad, b.is_leaf)
    for a, b in zip(params.make_grads(there, 7, 2), params.make_grads(here, 7, 2)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.device.type == "meta" and a.shape == b.shape and a.layout == b.layout
            if not a.is_sparse:
                assert a.stride() == b.stride()


def test_to_device_keeps_gaps_and_offsets():
    gapped = torch.randn(6, 8)[:, ::2]
    offset = torch.randn(50)[9:]
    for t in (gapped, offset, gapped.t(), torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        m = params.to_device(t, "meta")
        assert (m.shape, m.stride(), m.storage_offset()) == (t.shape, t.stride(), t.storage_offset())
    assert params.to_device(gapped, "cpu") is gapped


# --- the cross-device verdict, proven on one CPU under two device names ---------------------------

def _across(level_cases):
    return [dataclasses.replace(c, reference_device="cpu:0") for c in level_cases]


def _few(algo="Adam"):
    cases = levels.select("quick", algo, paths=["forloop", "fused"])
    return _across([c for c in cases if c.axis == "base"][:6])


def test_across_devices_identical_numbers_are_measured_not_claimed():
    report = run(prepare("optparity.optim:Adam", "torch.optim:Adam", cases=_few()))
    verdicts = {r.verdict for r in report.results}
    assert verdicts <= {Verdict.MEASURED_ACROSS_DEVICES, Verdict.SAME_ERROR}
    assert Verdict.MEASURED_ACROSS_DEVICES in verdicts and report.ok
    measured = next(r for r in report.results if r.verdict == Verdict.MEASURED_ACROSS_DEVICES)
    assert measured.status == "pass" and "not claimed equal: max 0 ulp" in measured.message
    assert measured.case.id.endswith("@cpu,reference=cpu:0")


def test_across_devices_distance_is_reported_and_max_ulp_decides():
    from optparity.harness.mutants import by_name
    from optparity.harness.report import format_text

    mutant = by_name("adam_lerp_as_mul_add").build()  # rounding-level differences only
    measured = run(prepare(mutant, "torch.optim:Adam", algorithm="Adam", cases=_few()))
    assert measured.ok, "distances across devices do not fail without --max-ulp"
    worst = max(r.worst_ulp for r in measured.results)
    assert worst > 0
    text = format_text(measured)
    assert "measured across devices (candidate on cpu, reference on cpu:0), not claimed equal" in text
    assert f"max {worst} ulp" in text
    r = max(measured.results, key=lambda r: r.worst_ulp)
    assert r.verdict == Verdict.MEASURED_ACROSS_DEVICES and r.max_abs_error > 0 and r.max_rel_error > 0
    assert "first difference: step" in r.message
    assert run(prepare(mutant, "torch.optim:Adam", algorithm="Adam", cases=_few(), max_ulp=worst)).ok
    over = run(prepare(mutant, "torch.optim:Adam", algorithm="Adam", cases=_few(), max_ulp=worst - 1))
    assert not over.ok and any(r.verdict == Verdict.NUMERICS_DIFFER for r in over.results)


# --- on a GPU ---------------------------------------------------------------------------------------

@needs_cuda
def test_cuda_params_start_from_the_cpu_numbers():
    for name in ("groups", "layouts", "values", "sparse"):
        cpu = params.make_params(name, torch.float32, 3, {"lr": 0.1})
        gpu = params.make_params(name, torch.float32, 3, {"lr": 0.1}, device="cuda")
        for a, b in zip(gpu.params, cpu.params):
            assert a.is_cuda and a.stride() == b.stride()
            assert torch.equal(a.detach().cpu().view(torch.int32), b.detach().view(torch.int32))
        for a, b in zip(params.make_grads(gpu, 3, 2), params.make_grads(cpu, 3, 2)):
            assert (a is None) == (b is None)
            if a is not None and not a.is_sparse:
                assert a.is_cuda and a.stride() == b.stride() and torch.equal(a.cpu(), b)


@needs_cuda
def test_cli_quick_adam_on_cuda_exits_0_with_fused_and_capturable_cases(tmp_path):
    out_json = tmp_path / "cuda.json"
    out = _cli("--candidate", "optparity.optim:Adam", "--level", "quick", "-q", "--device", "cuda",
               "--json", str(out_json))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = json.loads(out_json.read_text())["results"]
    assert all(r["case"].endswith("@cuda") for r in rows)
    fused = [r for r in rows if r["path"] == "fused"]
    capturable = [r for r in rows if "capturable=True" in r["config"] and r["verdict"] == Verdict.BIT_IDENTICAL]
    assert fused and capturable


@needs_cuda
def test_cli_cuda_against_cpu_reports_distances(tmp_path):
    out_json = tmp_path / "across.json"
    out = _cli("--candidate", "optparity.optim:Adam", "--level", "quick", "-q", "--device", "cuda",
               "--reference-device", "cpu", "--json", str(out_json))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "measured across devices (candidate on cuda, reference on cpu), not claimed equal" in out.stdout
    rows = json.loads(out_json.read_text())["results"]
    assert all(r["case"].endswith("@cuda,reference=cpu") for r in rows)
    assert any(r["verdict"] == Verdict.MEASURED_ACROSS_DEVICES and r["worst_ulp"] is not None for r in rows)
    assert not any("capturable=True" in r["config"] for r in rows)  # the CPU reference refuses capturable
