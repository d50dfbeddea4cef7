# Session 27, run 6: embedding forward tiles against Liger's forward; the backward by scan block.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 300 python3 benchmarks/probes/s27/fwd_scan_probe.py 4096,8192,16384 2>&1 | grep -v Warn | tee $OUT/r6.log
