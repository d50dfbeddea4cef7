python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 100 python3 benchmarks/probes/s24/probe3.py 2>&1 | tee $OUT/probe3.log
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_gated.py -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_tests.log
timeout 150 python3 scripts/bench_kernels.py --ops swiglu,geglu,rope --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | tee $OUT/bench.log
