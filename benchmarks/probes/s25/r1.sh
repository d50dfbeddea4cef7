# Session 25, run 1: the GPU tests of session 24's unrun edits, and the benchmark rows of the
# ops whose inputs now come through bench_kernels' _Upstream (rope, swiglu, geglu, cross_entropy).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cross_entropy.py \
  tests/kernels/test_cross_entropy_sm90.py tests/kernels/test_rope.py tests/kernels/test_gated.py 2>&1 \
  | tail -15 | tee $OUT/gpu_tests.log
timeout 240 python3 scripts/bench_kernels.py --ops rope,swiglu,geglu,cross_entropy --tokens 4096,8192,16384 \
  --out $OUT/bench 2>&1 | tee $OUT/bench.log
