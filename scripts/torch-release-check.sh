#!/usr/bin/env bash
# The other-release job (docs/support.md): optparity on a torch release other than CI's 2.13.0.
#
#   scripts/torch-release-check.sh 2.15.0 [VENV]     # VENV default /tmp/optparity-torch-<version>
#
# 1. a venv holding torch==VERSION (created if missing; an existing one is reused as it is);
# 2. `pip install -e .` into it, then fails if that replaced the torch (optparity must never);
# 3. the test suite at the quick level (pytest -n 2 -q), then `optparity check --all --level quick`
#    with JSON and JUnit reports, everything logged under $OUT (default reports/torch-<version>).
# Extra pip options (an index, a lifted constraints file) come from the environment as usual.
# Exit: 0 both passed; 1 the tests or the check failed; 2 the install replaced torch or failed.
set -uo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/torch-release-check.sh TORCH_VERSION [VENV]}
VENV=${2:-/tmp/optparity-torch-$VERSION}
OUT=${OUT:-reports/torch-$VERSION}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

installed_torch() { "$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null; }

[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" || exit 2
if [[ $(installed_torch) != "$VERSION" ]]; then
    "$VENV/bin/pip" install "torch==$VERSION" >"$OUT/install-torch.log" 2>&1 || { echo "torch $VERSION: install failed ($OUT/install-torch.log)"; exit 2; }
fi
"$VENV/bin/pip" install -e . >"$OUT/install-optparity.log" 2>&1 || { echo "pip install -e . failed ($OUT/install-optparity.log)"; exit 2; }
after=$(installed_torch)
if [[ $after != "$VERSION" ]]; then
    echo "pip install -e . replaced torch $VERSION with $after ($OUT/install-optparity.log)"
    exit 2
fi
echo "torch $VERSION kept by pip install -e ."

t0=$SECONDS
"$VENV/bin/python" -m pytest -n 2 -q -p no:cacheprovider --junitxml "$OUT/pytest.xml" >"$OUT/pytest.log" 2>&1
tests=$?
echo "pytest (quick level): exit $tests, $((SECONDS - t0)) s: $(tail -n 1 "$OUT/pytest.log")"
t0=$SECONDS
"$VENV/bin/optparity" check --all --level quick -q --json "$OUT/check-all.json" --junit "$OUT/check-all.xml" \
    >"$OUT/check-all.log" 2>&1
check=$?
echo "check --all --level quick: exit $check, $((SECONDS - t0)) s: $(grep '^all: ' "$OUT/check-all.log")"
grep -A40 '^version drift' "$OUT/check-all.log"
((tests == 0 && check == 0))
