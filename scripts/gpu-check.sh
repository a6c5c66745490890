#!/usr/bin/env bash
# The GPU check: every CUDA and NCCL path of optparity, on one GPU, within 8 minutes, with the
# machine's own torch (e.g. 2.11 + CUDA 13) and no network. docs/support.md describes it.
#
#   scripts/gpu-check.sh              # install optparity (--no-deps), preflight on the CPU, the CUDA steps
#   scripts/gpu-check.sh --no-install # optparity already importable (a venv with `pip install -e .`)
#   scripts/gpu-check.sh --dry-run    # preflight only, plus the test ids the CUDA steps would run
#
# Everything goes under $OUT (default reports/gpu-check/<UTC time>): one log per step, the check
# reports (JSON, JUnit, HTML), the bench run, the numerics map, and summary.txt.
# Steps, each with its own time limit, cut to what is left of 470 s ($GPU_CHECK_BUDGET_S) from the start:
#   1 pytest -m cuda            the tests marked as needing CUDA (tests/, suites/conformance)
#   2 check --all --device cuda --level quick
#   3 check --device cuda --reference-device cpu    a distance, not a proof (Adam, quick)
#   4 bench --device cuda       step latency and peak memory through torch.cuda
#   5 characterize              the numerics map with its CUDA columns
#   6 pytest -m nccl            the NCCL variants of the distributed suites at world size 1
# Exit: 0 every step passed; 1 a step failed or ran out of time (summary.txt says which);
# 2 optparity cannot be imported; 3 no CUDA device: the preflight ran, the CUDA steps were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

install=1 dry=0
for arg in "$@"; do
    case $arg in
        --no-install) install=0 ;;
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu-check.sh: unknown option $arg (--no-install, --dry-run)" >&2; exit 2 ;;
    esac
done

PY=${PYTHON:-python3}
OUT=${OUT:-reports/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
START=$SECONDS
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# Small pure-Python packages optparity uses at run time, installed from scripts/wheels (no network)
# when the machine lacks them: tabulate (markdown tables of bench and characterize), tqdm (bench's
# progress bar), expecttest (torch's own test configurations).
install_missing_wheels() {
    local missing=()
    for mod in tabulate tqdm expecttest; do
        "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
    done
    if ((${#missing[@]})); then
        say "installing from scripts/wheels: ${missing[*]}"
        "$PY" -m pip install -q --no-index --no-deps --find-links scripts/wheels "${missing[@]}" >>"$OUT/install.log" 2>&1 \
            || say "WARNING: could not install ${missing[*]} from scripts/wheels (see install.log)"
    fi
}

if ((install)); then
    install_missing_wheels
    # no network: no build isolation (it would fetch setuptools); the machine's setuptools builds it
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1; then
        say "WARNING: pip install --no-deps -e . failed (install.log); running from the source tree (PYTHONPATH=impl)"
        export PYTHONPATH="$PWD/impl${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

# Preflight, on the CPU: versions, what is importable, the GPU. One Python process (one torch import).
"$PY" - "$OUT" >"$OUT/preflight.log" 2>&1 <<'EOF'
import importlib, json, os, shutil, subprocess, sys
out = sys.argv[1]
need = {"torch": "everything", "numpy": "everything", "pandas": "check reports, bench, characterize",
        "scipy": "every optparity command (its parser imports bench's regression rule)",
        "matplotlib": "HTML plots, bench figures, the numerics heat map", "pytest": "steps 1 and 6",
        "xdist": "pytest -n (optional)", "tabulate": "markdown tables (bench, characterize)",
        "tqdm": "bench's progress bar (optional)", "expecttest": "torch's own test configurations (tests)"}
found = {}
for mod, why in need.items():
    try:
        m = importlib.import_module(mod)
        found[mod] = getattr(m, "__version__", "present")
    except Exception as e:  # noqa: BLE001 - reported, the steps that need it say so
        found[mod] = None
        print(f"MISSING {mod}: needed by {why} ({type(e).__name__}: {e})")
info = {"python": sys.version.split()[0], "modules": found}
try:
    import optparity
    from optparity import versions
    info["optparity"] = optparity.__file__
    info["compared_against"] = versions.compared_against()
except Exception as e:  # noqa: BLE001
    print(f"OPTPARITY NOT IMPORTABLE: {type(e).__name__}: {e}")
    info["optparity"] = None
import torch
info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
            devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            nccl=torch.distributed.is_nccl_available() if torch.distributed.is_available() else False,
            cpu_capability=torch.backends.cpu.get_cpu_capability())
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
json.dump(info, open(os.path.join(out, "environment.json"), "w"), indent=1)
for k, v in info.items():
    print(f"{k}: {v}")
EOF
cat "$OUT/preflight.log" >>"$SUMMARY"
cat "$OUT/preflight.log"
if grep -q "^OPTPARITY NOT IMPORTABLE" "$OUT/preflight.log" || ! grep -q "^torch: " "$OUT/preflight.log"; then
    say "FAILED: the preflight could not import optparity or torch (preflight.log)"
    exit 2
fi
has() { ! grep -q "^MISSING $1:" "$OUT/preflight.log"; }

# The test selections the CUDA steps use, collected on any machine (proves the markers select).
CUDA_TESTS=(tests suites/conformance -m cuda)
NCCL_TESTS=(suites/distributed -m nccl)
export OPTPARITY_WORLD_SIZES=1  # the distributed suites' conftest keeps world size 1 only
if ((dry)); then
    for sel in cuda nccl; do
        if [[ $sel == cuda ]]; then args=("${CUDA_TESTS[@]}"); else args=("${NCCL_TESTS[@]}"); fi
        "$PY" -m pytest --collect-only -q -p no:cacheprovider "${args[@]}" >"$OUT/collected-$sel.txt" 2>&1
        say "would run $(grep -c '::' "$OUT/collected-$sel.txt") tests marked $sel (collected-$sel.txt)"
    done
fi

if ! grep -q "^cuda_available: True" "$OUT/preflight.log"; then
    say "SKIPPED: no CUDA device here (torch.cuda.is_available() is False): the preflight ran on the CPU;"
    say "  the CUDA steps (cuda tests, check --device cuda, cross-device distance, bench --device cuda,"
    say "  the numerics map's CUDA columns, NCCL suites at world size 1) did not run. Exit 3."
    exit 3
fi
if ((dry)); then
    say "dry run: stopping before the CUDA steps"
    exit 0
fi

failed=0 passed=0
# The whole script, install and preflight included, stays within 8 minutes: a step's limit is cut
# to what is left of BUDGET_S (its own limits add up to 465 s).
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
# run_step NAME LIMIT_S NEEDS CMD...: the command under `timeout` (SIGTERM: check writes partial reports)
run_step() {
    local name=$1 limit=$2 needs=$3 t0=$SECONDS rc left
    shift 3
    for mod in $needs; do
        if ! has "$mod"; then
            say "$name: SKIPPED, needs $mod (see preflight.log)"; failed=$((failed + 1)); return
        fi
    done
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 5)); then
        say "$name: NOT RUN, the ${BUDGET_S}-s budget is spent"; failed=$((failed + 1)); return
    fi
    ((limit > left)) && limit=$left
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local verdict=ok
    ((rc == 124 || rc == 137 || rc == 143)) && verdict="OUT OF TIME (${limit}s)"
    ((rc != 0)) && [[ $verdict == ok ]] && verdict="FAILED"
    ((rc == 0)) && passed=$((passed + 1)) || failed=$((failed + 1))
    say "$name: $verdict, exit $rc, $((SECONDS - t0)) s ($name.log): $(tail -n 1 "$OUT/$name.log")"
}

OPT=("$PY" -m optparity)
run_step 1-cuda-tests 90 "pytest" "$PY" -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}" \
    --junitxml "$OUT/cuda-tests.xml"
run_step 2-check-all-cuda 150 "pandas scipy" "${OPT[@]}" check --all --device cuda --level quick -q -n 4 \
    --json "$OUT/check-cuda/all.json" --junit "$OUT/check-cuda/all.xml" --html "$OUT/check-cuda/html"
run_step 3-cuda-vs-cpu 45 "pandas scipy" "${OPT[@]}" check --candidate optparity.optim:Adam --device cuda \
    --reference-device cpu --level quick -q -n 4 --json "$OUT/cuda-vs-cpu/adam.json"
run_step 4-bench-cuda 60 "pandas scipy matplotlib tabulate" "${OPT[@]}" bench --device cuda --quick \
    --algorithms Adam,AdamW,SGD --out "$OUT/bench" --run-name cuda --no-progress
run_step 5-numerics-cuda 60 "pandas scipy matplotlib tabulate" "${OPT[@]}" characterize --dtypes float32,bfloat16 \
    --no-compile --steps 5 --numel 65536 --out "$OUT/numerics" -q
run_step 6-nccl-world-size-1 60 "pytest" "$PY" -m pytest -q -p no:cacheprovider "${NCCL_TESTS[@]}" \
    --junitxml "$OUT/nccl.xml"

say "GPU check: $passed of 6 steps passed, $failed failed or skipped, $((SECONDS - START)) s; results in $OUT"
((failed == 0))
