python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 400 python3 benchmarks/probes/s24/probe2.py 2>&1 | tee $OUT/probe2.log
