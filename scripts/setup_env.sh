#!/usr/bin/env bash
# Create (once) and activate the project virtualenv with ligerzoo and its test extra.
# Sourced by scripts/demo.sh and scripts/test.sh. Without a GPU, torch is pinned to 2.13.0
# (this project's machines hold a CPU build of it on disk; elsewhere set PIP_INDEX_URL or
# PIP_EXTRA_INDEX_URL to a CPU wheel index first, or pip takes PyPI's larger CUDA build). On a
# machine that already has torch (e.g. a GPU image), set LIGERZOO_SYSTEM_PYTHON=1 to use it.
# The caller's working directory is left as it was (demo.sh's relative --out keeps its meaning;
# test.sh then runs pytest from the repository root); the install runs in a subshell there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${LIGERZOO_SYSTEM_PYTHON:-0}" = "1" ]; then
  PY=python3
else
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
  fi
  PY="$ROOT/.venv/bin/python"
  # large wheels (triton's is ~290 MB) over a connection that drops: pip resumes them instead of
  # failing the install (pip >= 25.1; older pips ignore the setting)
  export PIP_RESUME_RETRIES="${PIP_RESUME_RETRIES:-30}" PIP_RETRIES="${PIP_RETRIES:-10}"
  if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$PY" -m pip install -q torch
    else
      "$PY" -m pip install -q "torch==2.13.0"
    fi
  fi
  if ! "$PY" -c "import ligerzoo, transformers, gguf, pytest, xdist" 2>/dev/null; then
    (cd "$ROOT" && "$PY" -m pip install -q -e ".[test]")
  fi
fi
export PY ROOT
