# Session 28, run 2: GPU tests of rope and the gated ops after the kernel changes (1-D gated
# grid; rope's constexpr sizes and int32 head offsets), then probe 2's tile and warp sweeps.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_gated.py 2>&1 | tail -3 | tee $OUT/r2_tests.log
timeout 120 python3 benchmarks/probes/s28/tiles.py rope 2>&1 | grep -v Warn | tee $OUT/r2_rope.log
timeout 280 python3 benchmarks/probes/s28/tiles.py gated 2>&1 | grep -v Warn | tee $OUT/r2_gated.log
