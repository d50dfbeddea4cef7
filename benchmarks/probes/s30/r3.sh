# Session 30, runs 3-4: rope_l2.py (the 4096-token gap with and without L2 flushes; run 4 with
# the flushed times under CUDA graphs).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/probes/s30/rope_l2.py 2>&1 | grep -v Warn | tee $OUT/r4_rope_l2.log
