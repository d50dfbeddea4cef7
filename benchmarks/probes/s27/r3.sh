# Session 27, run 3: embedding's host timeline (emb_marks.py), ours against Liger's.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 300 python3 benchmarks/probes/s27/emb_marks.py 4096,8192 2>&1 | grep -v Warn | tee $OUT/r3.log
