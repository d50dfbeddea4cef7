python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/probes/s24/probe6.py 2>&1 | tee $OUT/probe6.log
timeout 100 python3 scripts/bench_kernels.py --ops cross_entropy --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | tee $OUT/bench.log
timeout 120 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_gated.py tests/kernels/test_cross_entropy.py -p no:cacheprovider -k "inplace or rope or gated" 2>&1 | tail -4 | tee $OUT/gpu_tests.log
