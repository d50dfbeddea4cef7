# Session 28, run 5: rope's warps over the families' head shapes (probe 3).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 300 python3 benchmarks/probes/s28/rope_warps.py 2>&1 | grep -v Warn | tee $OUT/r5_rope_warps.log
