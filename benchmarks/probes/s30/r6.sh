# Prepared in session 30 for a later session (not run yet): the checkpointed Llama-3-8B 8 x 4096
# pair that run 2's time limit cut (ligerzoo, then transformers + Liger Kernel, each in its own
# process), so e2e.csv's checkpointed rows can come from one run of the current code.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 240 python3 scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096 --variants ligerzoo,liger --checkpointing on --out $OUT/e2e 2>&1 | grep -v Warn | tail -8 | tee $OUT/r6_e2e_ckpt.log
