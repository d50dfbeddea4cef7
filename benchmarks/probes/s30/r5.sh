# Session 30, run 5: rope_l2_warps.py (the warp sweep in the model's case, L2 flushed before each pass).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 240 python3 benchmarks/probes/s30/rope_l2_warps.py 2>&1 | grep -v Warn | tee $OUT/r5_rope_l2_warps.log
