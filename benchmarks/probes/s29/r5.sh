# Session 29, run 5: rope's constexprs passed by keyword (DirectLaunch's fast relaunch again):
# its GPU tests and DirectLaunch's, and the benchmark's rope rows.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 120 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_launch.py --tb=short 2>&1 | grep -v Warn | tail -30 | tee $OUT/r5_tests.log
PAIRED=1 timeout 150 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops rope \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r5_bench.log
rm -rf $OUT/bench/*.png
