# Session 27, run 2: embedding's host time by piece, ours against Liger's, and cProfiles.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 300 python3 benchmarks/probes/s27/emb_host.py 4096 2>&1 | grep -v Warn | tee $OUT/r2.log
