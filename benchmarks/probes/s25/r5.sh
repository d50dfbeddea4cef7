# Session 25, run 5: the in-place cross entropy no longer waits for the label check before its
# launch (the kernels read the check's device answer and write nothing on a bad target): GPU
# tests of the loss files (the bad-target test asserts the logits stay intact), then
# cross_entropy's rows, paired, with --graph.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cross_entropy.py \
  tests/kernels/test_cross_entropy_sm90.py tests/kernels/test_fused_linear_cross_entropy.py 2>&1 | tail -4 | tee $OUT/gpu_tests.log
PAIRED=1 timeout 150 python3 scripts/bench_kernels.py --graph --ops cross_entropy --tokens 4096,8192,16384 \
  --out $OUT/bench_ce 2>&1 | grep -v "^Search\|^CUDA kernel\|^For debugging\|^Compile with" | tee $OUT/bench_ce.log
