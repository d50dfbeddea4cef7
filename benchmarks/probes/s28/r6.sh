# Session 28, run 6: rope's new warp rule: its GPU tests, probe 3 again (the rule's column is
# the package's choice), and the benchmark's rope rows (paired, device time under CUDA graphs).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_rope.py --tb=short 2>&1 | grep -v Warn | tail -3 | tee $OUT/r6_tests.log
timeout 200 python3 benchmarks/probes/s28/rope_warps.py 2>&1 | grep -v Warn | tee $OUT/r6_rope_warps.log
PAIRED=1 timeout 150 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops rope \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r6_bench.log
rm -rf $OUT/bench/*.png
