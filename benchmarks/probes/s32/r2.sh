# Session 32, run 2: (1) session 31's r8.sh: Mixtral-8x7B 2 layers 4 x 2048, transformers eager and
# + torch.compile (the rows e2e.csv lacks), on a quiet GPU; (2) then every flex GPU test (run 1's
# 200 s limit stopped them after 5 of 12; mostly inductor compiles, so three pytest processes).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=300
timeout 320 python3 scripts/bench_e2e.py --models mixtral-8x7b-2l --shapes 4x2048 --checkpointing off --variants hf,compile --out $OUT/mix 2>&1 | grep "tok/s\|rate\|wall\|rror" | tee $OUT/r2_mixtral.log
F=tests/models/test_flex_gpu.py; T="test_block_masks_match_transformers_on_cuda"
P="timeout 230 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider"
$P "$F::$T[llama]" "$F::$T[mistral]" "$F::$T[mixtral]" "$F::$T[gemma]" > $OUT/r2_flex_a.log 2>&1 &
$P "$F::$T[qwen2]" "$F::$T[phi3]" "$F::$T[gemma2]" > $OUT/r2_flex_b.log 2>&1 &
$P $F -k "not $T" > $OUT/r2_flex_c.log 2>&1 &
wait
for f in $OUT/r2_flex_*.log; do grep -v "Warn\|warn" $f | tail -3; done
