# Session 33, run 2: rope_tokens.py (several tokens per program; q and k heads as one tile in the
# fused qkv layout), L2 flushed before each pass.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
timeout 560 python3 benchmarks/probes/s33/rope_tokens.py 2>&1 | grep -v Warn | tee $OUT/r2_rope_tokens.log
