# Session 25, run 4: cross entropy under CUDA-graph capture (the target check skipped while
# capturing): the GPU tests of the loss files, cross_entropy's rows paired with --graph, and
# the device time under CUDA graphs (--graph) of the other ops, ours and Liger's, one process
# per op (a failed capture can poison the process's later captures).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cross_entropy.py \
  tests/kernels/test_fused_linear_cross_entropy.py 2>&1 | tail -6 | tee $OUT/gpu_tests.log
PAIRED=1 timeout 200 python3 scripts/bench_kernels.py --graph --ops cross_entropy --tokens 4096,8192,16384 \
  --out $OUT/bench_ce 2>&1 | tee $OUT/bench_ce.log
for op in rms_norm fused_add_rms_norm layer_norm group_norm group_norm_2d embedding kl_div jsd swiglu_fused; do
  PAIRED=1 ROUNDS=2 timeout 100 python3 scripts/bench_kernels.py --graph --variants ligerzoo,liger --ops $op \
    --tokens 4096,8192,16384 --out $OUT/bench_$op 2>&1 | grep -v Warning | tee -a $OUT/bench_graph.log
done
