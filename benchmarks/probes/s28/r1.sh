# Session 28, run 1: swiglu at 16384 x 14336 and rope at 4096 tokens / head_dim 96, launch variants
# against Liger's (device time under CUDA graphs).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 280 python3 benchmarks/probes/s28/glu_rope.py glu 2>&1 | grep -v Warn | tee $OUT/r1_glu.log
timeout 250 python3 benchmarks/probes/s28/glu_rope.py rope 2>&1 | grep -v Warn | tee $OUT/r1_rope.log
