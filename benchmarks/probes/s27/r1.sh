# Session 27, run 1: embedding's plain step timeline, ours against Liger's.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 300 python3 benchmarks/probes/s27/emb_trace.py 4096,8192 $OUT 2>&1 | grep -v Warn | tee $OUT/r1.log
