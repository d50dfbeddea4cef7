# Session 31, run 2: transformers eager (hf) and torch.compile on the shapes e2e.csv has only
# ligerzoo / Liger rows for: Llama-3-8B checkpointed at both shapes, Qwen2.5-7B and Gemma2-9B at
# 4 x 2048; then transformers eager's longest batch-1 sequence (from 32768). Each in its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=200
E="python3 scripts/bench_e2e.py"
timeout 230 $E --models llama3-8b-8l --shapes 8x4096,4x2048 --variants hf,compile --checkpointing on --out $OUT/ck 2>&1 | grep -v Warn | tail -12 | tee $OUT/r2_ckpt.log
timeout 230 $E --models qwen2.5-7b-4l,gemma2-9b-4l --shapes 4x2048 --variants hf,compile --checkpointing off --out $OUT/fam 2>&1 | grep -v Warn | tail -12 | tee $OUT/r2_fam.log
timeout 100 $E --longest llama3-8b-8l --longest-from 32768 --variants hf --out $OUT/long 2>&1 | grep -v Warn | tail -6 | tee $OUT/r2_long.log
