#!/usr/bin/env bash
# Device-machine run of the end-to-end benchmark. Carry .gpu3/ (whl/ holds the liger-kernel
# wheel; see scripts/gpu_bench.sh for how to build it). Arguments go to scripts/bench_e2e.py;
# PROFILE=N prints the N costliest CUDA kernels of one extra step per variant.
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 scripts/bench_e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
