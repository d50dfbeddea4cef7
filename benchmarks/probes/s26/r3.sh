# Session 26, run 3: the loss kernels taking log p = (z - max) - log(d) (no fp32-rounded lse):
# GPU tests of the cross-entropy files, the fused linear losses and jsd (the Hopper kernel's
# new confident-rows test among them), then their device times against run 2's (same shapes).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_cross_entropy.py \
  tests/kernels/test_cross_entropy_sm90.py tests/kernels/test_fused_linear_cross_entropy.py \
  tests/kernels/test_fused_linear_jsd.py tests/kernels/test_jsd.py 2>&1 | tail -8 | tee $OUT/gpu_tests.log
PAIRED=1 timeout 120 python3 scripts/bench_kernels.py --graph --variants ligerzoo,liger --ops cross_entropy \
  --tokens 4096,8192,16384 --out $OUT/bench_ce 2>&1 | grep -v "Warn\|^Search" | tee $OUT/bench.log
for n in 4096 8192 16384; do
  timeout 50 python3 scripts/bench_kernels.py --graph-only --variants ligerzoo --ops fused_linear_cross_entropy \
    --tokens $n --out $OUT/g_flce_$n 2>&1 | grep -v Warn | tee -a $OUT/graph_only.log
done
timeout 60 python3 scripts/bench_kernels.py --graph-only --variants ligerzoo --ops fused_linear_jsd \
  --tokens 4096,8192,16384 --out $OUT/g_fljsd 2>&1 | grep -v Warn | tee -a $OUT/graph_only.log
rm -rf $OUT/g_* $OUT/bench_ce/*.png
