# Session 26, run 2: paired_ms with a synchronize before each call (no queued work from the
# variant timed before): the paired rows of rope, swiglu, geglu and cross_entropy again, every
# variant, with --graph; layer_norm and embedding paired (session 20's claim, ours and Liger's);
# fused linear cross entropy's device time (ours: Liger's cannot be captured and its failed
# capture poisons the process, run 1), one process per size.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
PAIRED=1 timeout 300 python3 scripts/bench_kernels.py --graph --ops rope,swiglu,geglu,cross_entropy \
  --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/bench.log
PAIRED=1 timeout 100 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops layer_norm,embedding \
  --tokens 4096,8192,16384 --out $OUT/bench_le 2>&1 | grep -v Warn | tee $OUT/bench_le.log
for n in 4096 8192 16384; do
  timeout 60 python3 scripts/bench_kernels.py --graph-only --variants ligerzoo --ops fused_linear_cross_entropy \
    --tokens $n --out $OUT/g_flce_$n 2>&1 | grep -v Warn | tee -a $OUT/graph_only.log
done
rm -rf $OUT/g_flce_* $OUT/bench_le/*.png
