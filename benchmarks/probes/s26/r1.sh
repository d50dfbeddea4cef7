# Session 26, run 1: what the host-bound plain rows of rope / swiglu / geglu are made of
# (host_dist.py), the copy bandwidth against size (copy_bw.py), the in-place rows again (paired,
# --graph), and device-time rows not measured before (--graph-only): the fused linear losses
# and group_norm_2d at 8192 / 16384 tokens.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
nproc; cat /sys/fs/cgroup/cpu.max 2>/dev/null
timeout 60 python3 benchmarks/probes/s26/copy_bw.py 2>&1 | tee $OUT/copy_bw.log
timeout 120 python3 benchmarks/probes/s26/host_dist.py rope,swiglu,geglu 4096,8192,16384 2>&1 | grep -v Warn | tee $OUT/host_dist.log
PAIRED=1 timeout 240 python3 scripts/bench_kernels.py --graph --ops rope,swiglu,geglu \
  --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/bench.log
for op in fused_linear_cross_entropy fused_linear_jsd; do
  timeout 60 python3 scripts/bench_kernels.py --graph-only --variants ligerzoo,liger --ops $op \
    --tokens 4096,8192,16384 --out $OUT/g_$op 2>&1 | grep -v Warn | tee -a $OUT/graph_only.log
done
timeout 90 python3 scripts/bench_kernels.py --graph-only --variants ligerzoo,liger --ops group_norm_2d \
  --tokens 8192,16384 --out $OUT/g_gn2d 2>&1 | grep -v Warn | tee -a $OUT/graph_only.log
