# Prepared in session 31 for a later session (not run yet; about 6 minutes of device time): the
# Mixtral-8x7B 2-layer 4 x 2048 rows e2e.csv lacks, transformers eager and + torch.compile (Liger's
# Mixtral process took about 320 s in session 15, most of it before its first step).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=330
timeout 340 python3 scripts/bench_e2e.py --models mixtral-8x7b-2l --shapes 4x2048 --checkpointing off --variants hf,compile --out $OUT/mix 2>&1 | grep -v Warn | tail -8 | tee $OUT/r8_mixtral.log
