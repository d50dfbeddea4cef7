# Session 25, run 3: after the host-time trims of the in-place paths (overwritable's contiguous
# fast path, detach() for the in-place gradients, GLU outputs allocated in shape): GPU tests of
# the touched ops and the models, host time per step again, and the in-place rows paired, with
# their device time under CUDA graphs (--graph: mode full_graph).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels/test_rope.py tests/kernels/test_gated.py \
  tests/models/test_llama_gpu.py 2>&1 | tail -4 | tee $OUT/gpu_tests.log
timeout 120 python3 benchmarks/probes/s25/host_probe.py 2>&1 | tee $OUT/host_probe.log
PAIRED=1 timeout 330 python3 scripts/bench_kernels.py --graph --ops rope,swiglu,geglu,cross_entropy \
  --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | tee $OUT/bench.log
