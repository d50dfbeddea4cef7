# Session 31, run 1: the issue-5 rows e2e.csv lacks. (1) Full activation checkpointing at both
# Llama-3-8B shapes, ligerzoo and transformers + Liger Kernel from one run (8 x 4096's Liger row
# is session 15's; 4 x 2048 checkpointed never ran). (2) transformers eager and torch.compile at
# Llama 4 x 2048 (only 8 x 4096 has them). (3) A profile of the current ligerzoo step at 8 x 4096
# (the last is session 15's). Each variant in its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=200
E="python3 scripts/bench_e2e.py --models llama3-8b-8l"
timeout 260 $E --shapes 8x4096,4x2048 --variants ligerzoo,liger --checkpointing on --out $OUT/ck 2>&1 | grep -v Warn | tail -12 | tee $OUT/r1_ckpt.log
timeout 200 $E --shapes 4x2048 --variants hf,compile --checkpointing off --out $OUT/hc 2>&1 | grep -v Warn | tail -8 | tee $OUT/r1_hf_compile.log
STEPS=4 WARMUP=2 PROFILE=45 timeout 90 $E --shapes 8x4096 --variants ligerzoo --checkpointing off --out /tmp/p > $OUT/r1_profile.log 2>&1
grep "tok/s\|rate\|GPU span" $OUT/r1_profile.log
