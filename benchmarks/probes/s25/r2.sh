# Session 25, run 2: host time per step of the in-place rows, and those rows with the
# variants' calls interleaved (PAIRED=1), the method for host-bound steps (NOTES, session 20).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 120 python3 benchmarks/probes/s25/host_probe.py 2>&1 | tee $OUT/host_probe.log
PAIRED=1 timeout 300 python3 scripts/bench_kernels.py --ops rope,swiglu,geglu,cross_entropy --tokens 4096,8192,16384 \
  --out $OUT/bench 2>&1 | tee $OUT/bench.log
