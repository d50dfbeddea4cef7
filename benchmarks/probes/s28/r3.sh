# Session 28, run 3: the gated ops' new tiles (1-D grid) and rope unchanged: their GPU tests
# (with the new rope test of head offsets past 2^31), and the paired benchmark rows with device
# time under CUDA graphs, ours against Liger's.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 120 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_gated.py --tb=short 2>&1 | grep -v Warn | tail -25 | tee $OUT/r3_tests.log
PAIRED=1 timeout 330 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops swiglu,geglu,swiglu_fused \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r3_bench.log
rm -rf $OUT/bench/*.png
