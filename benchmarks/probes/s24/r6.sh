python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/probes/s24/probe5.py 2>&1 | tee $OUT/probe5.log
timeout 150 python3 scripts/bench_kernels.py --ops cross_entropy,swiglu_fused --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | tee $OUT/bench.log
