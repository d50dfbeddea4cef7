# Session 29, run 3: rope with the four half-tiles loaded before the tables: its GPU tests, probe 1
# with run 2's kernel beside, and the benchmark's rope rows. (rope_b.py is no longer kept: see
# README.md here for how to restore it from commit 42348db.)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_ops.py tests/models/test_llama_gpu.py --tb=short 2>&1 | grep -v Warn | tail -40 | tee $OUT/r3_tests.log
PREV=benchmarks/probes/s29/rope_b.py timeout 420 python3 benchmarks/probes/s29/rope_sweep.py 2>&1 | grep -v Warn | tee $OUT/r3_rope_sweep.log
PAIRED=1 timeout 150 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops rope \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r3_bench.log
rm -rf $OUT/bench/*.png
