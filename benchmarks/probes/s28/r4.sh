# Session 28, run 4: the final gated code (1-D grid, new tiles, the fused tensor passed whole
# with column offsets): its GPU tests, the Llama GPU model tests (fused gate/up in the MLP),
# and the paired benchmark rows with device time under CUDA graphs, ours against Liger's.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_gated.py tests/models/test_llama_gpu.py --tb=short 2>&1 | grep -v Warn | tail -15 | tee $OUT/r4_tests.log
PAIRED=1 timeout 330 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops swiglu,geglu,swiglu_fused \
  --tokens 4096,8192,16384 --graph --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r4_bench.log
rm -rf $OUT/bench/*.png
