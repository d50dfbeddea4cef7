#!/usr/bin/env bash
# The device-machine runs behind benchmarks/NOTES.md's e2e section (one call each):
#   bash scripts/gpu_e2e_runs.sh probe   # ligerzoo variants at 8x4096, checkpointing, longest sequence
#   bash scripts/gpu_e2e_runs.sh probe2  # MoE check, profiles, hf/compile, load time
#   bash scripts/gpu_e2e_runs.sh final   # ligerzoo vs Liger on every shape, Liger's longest sequence
#   bash scripts/gpu_e2e_runs.sh recheck # what changed after the final run: checkpointing, review fixes
#   bash scripts/gpu_e2e_runs.sh same    # session 15: every shape, ligerzoo and Liger in the same run (two calls:
#   bash scripts/gpu_e2e_runs.sh same2   #   Liger's Mixtral process needs about 320 s, most of it before its first step)
# Carry .gpu3/ (see scripts/gpu_bench.sh).
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
B="python3 scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096"
case "${1:-probe}" in
probe)
  STEPS=4 WARMUP=2 PROFILE=30 $B --variants ligerzoo --checkpointing off --out "$OUT/a" > "$OUT/profile.log" 2>&1
  grep "tok/s\|rate" "$OUT/profile.log"
  STEPS=4 WARMUP=2 LZ_CHUNK_ROWS=4096 $B --variants ligerzoo --checkpointing off --out "$OUT/b" 2>&1 | grep "tok/s" | sed 's/^/chunk4096 /'
  STEPS=4 WARMUP=2 LZ_NO_TARGET_CHECK=1 $B --variants ligerzoo --checkpointing off --out "$OUT/c" 2>&1 | grep "tok/s" | sed 's/^/nocheck /'
  STEPS=3 WARMUP=1 SPAWN_TIMEOUT=150 $B --variants ligerzoo,liger --checkpointing on --out "$OUT/d" 2>&1 | grep "tok/s\|wall"
  STEPS=2 WARMUP=1 SPAWN_TIMEOUT=200 python3 scripts/bench_e2e.py --longest llama3-8b-8l --longest-from 65536 --variants ligerzoo --out "$OUT/e" 2>&1 | grep "tok/s\|wall"
  ;;
probe2)
  python3 scripts/check_moe_gpu.py 2>&1 | tail -4
  STEPS=4 WARMUP=2 PROFILE=25 $B --variants ligerzoo --checkpointing off --out /tmp/a > "$OUT/profile.log" 2>&1
  grep "tok/s\|rate\|GPU span\|gap " "$OUT/profile.log"
  STEPS=3 WARMUP=1 PROFILE=25 $B --variants ligerzoo --checkpointing on --out /tmp/b > "$OUT/profile_ckpt.log" 2>&1
  grep "tok/s\|GPU span\|gap " "$OUT/profile_ckpt.log"
  STEPS=4 WARMUP=2 python3 scripts/bench_e2e.py --models mixtral-8x7b-2l,qwen2.5-7b-4l --shapes 4x2048 \
    --checkpointing off --variants ligerzoo --out /tmp/c 2>&1 | grep "tok/s"
  STEPS=4 WARMUP=2 $B --variants hf,compile --checkpointing off --out /tmp/d 2>&1 | grep "tok/s\|wall"
  cp /tmp/d/e2e.csv "$OUT/e2e_hf_compile.csv"
  python3 scripts/bench_load.py --repeats 2 --out /tmp/e 2>&1 | grep -v "Loading\|Warn"
  cp /tmp/e/load.csv "$OUT/load.csv"
  ;;
final)
  python3 scripts/check_moe_gpu.py 2>&1 | tail -3
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_fused_linear_cross_entropy.py \
    -k "compile or (real_size and bfloat16 and plain)" 2>&1 | tail -2
  export SPAWN_TIMEOUT=120 STEPS=4 WARMUP=2
  $B --variants ligerzoo,liger --checkpointing off,on --out /tmp/f 2>&1 | grep "tok/s\|rate"
  cp /tmp/f/e2e.csv "$OUT/e2e_llama.csv"
  python3 scripts/bench_e2e.py --models llama3-8b-8l,qwen2.5-7b-4l,gemma2-9b-4l,mixtral-8x7b-2l --shapes 4x2048 \
    --variants ligerzoo,liger --checkpointing off --out /tmp/g 2>&1 | grep "tok/s\|rate"
  cp /tmp/g/e2e.csv "$OUT/e2e_families.csv"
  STEPS=2 WARMUP=1 python3 scripts/bench_e2e.py --longest llama3-8b-8l --longest-from 65536 --variants liger \
    --out /tmp/h 2>&1 | grep "tok/s"
  cp /tmp/h/e2e_longest.csv "$OUT/e2e_longest_liger.csv"
  ;;
recheck)
  export SPAWN_TIMEOUT=150 STEPS=4 WARMUP=2
  $B --variants ligerzoo,liger --checkpointing off,on --out /tmp/r 2>&1 | grep "tok/s\|rate"
  cp /tmp/r/e2e.csv "$OUT/e2e_recheck.csv"
  STEPS=2 WARMUP=1 python3 scripts/bench_e2e.py --longest llama3-8b-8l --longest-from 131072 --variants ligerzoo \
    --out /tmp/s 2>&1 | grep "tok/s"
  ;;
same)
  STEPS=4 WARMUP=2 PROFILE=45 timeout 150 $B --variants ligerzoo --checkpointing off --out /tmp/a > "$OUT/profile.log" 2>&1
  grep "tok/s\|rate\|GPU span" "$OUT/profile.log"
  export SPAWN_TIMEOUT=150 STEPS=4 WARMUP=2
  $B --variants ligerzoo,liger --checkpointing off,on --out /tmp/f 2>&1 | grep "tok/s\|rate\|wall"
  cp /tmp/f/e2e.csv "$OUT/e2e_llama.csv"
  python3 scripts/bench_e2e.py --models qwen2.5-7b-4l,gemma2-9b-4l,llama3-8b-8l --shapes 4x2048 \
    --variants ligerzoo,liger --checkpointing off --out /tmp/g 2>&1 | grep "tok/s\|rate\|wall"
  cp /tmp/g/e2e.csv "$OUT/e2e_families.csv"
  ;;
same2)
  SPAWN_TIMEOUT=330 STEPS=4 WARMUP=2 python3 scripts/bench_e2e.py --models mixtral-8x7b-2l --shapes 4x2048 \
    --variants liger,ligerzoo --checkpointing off --out /tmp/m 2>&1 | grep "tok/s\|rate\|wall"
  cp /tmp/m/e2e.csv "$OUT/e2e_mixtral.csv"
  SPAWN_TIMEOUT=120 STEPS=2 WARMUP=1 python3 scripts/bench_e2e.py --longest llama3-8b-8l --longest-from 131072 \
    --variants ligerzoo --out /tmp/s 2>&1 | grep "tok/s\|rate"
  cp /tmp/s/e2e_longest.csv "$OUT/e2e_longest_ligerzoo.csv"
  ;;
esac
