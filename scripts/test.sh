#!/usr/bin/env bash
# The test suite (CPU tier): Triton kernels under the interpreter, model parity against
# transformers, checkpoint round trips, the real SmolLM2 checkpoint. Extra args go to pytest.
# Tests run in LIGERZOO_TEST_WORKERS processes (pytest-xdist; default 2, the CI machine's
# cores); 0, or a Python without pytest-xdist, runs them in this process (as --pdb needs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
WORKERS="${LIGERZOO_TEST_WORKERS:-2}"
DIST=()
if [ "$WORKERS" != "0" ] && "$PY" -c "import xdist" 2>/dev/null; then
  DIST=(-n "$WORKERS")
fi
exec "$PY" -m pytest -q ${DIST[@]+"${DIST[@]}"} "$@"
