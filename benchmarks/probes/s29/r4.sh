# Session 29, run 4: the kept kernel (run 2's) under the new warp rule: its GPU tests, probe 1
# (the rule's column is the package's choice), and the benchmark's rope rows.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 120 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/models/test_llama_gpu.py --tb=short 2>&1 | grep -v Warn | tail -30 | tee $OUT/r4_tests.log
timeout 250 python3 benchmarks/probes/s29/rope_sweep.py 2>&1 | grep -v Warn | tee $OUT/r4_rope_sweep.log
PAIRED=1 timeout 150 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops rope \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r4_bench.log
rm -rf $OUT/bench/*.png
