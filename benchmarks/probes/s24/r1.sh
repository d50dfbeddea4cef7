python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_kl_div.py -p no:cacheprovider 2>&1 | tail -5 | tee $OUT/kl_gpu_tests.log
timeout 200 python3 benchmarks/probes/s24/rope_probe.py 2>&1 | tee $OUT/rope_probe.log
timeout 260 python3 scripts/bench_kernels.py --ops swiglu,geglu,swiglu_fused,rope,cross_entropy,kl_div --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | tee $OUT/bench.log
