# Prepared in session 29 for a later session (not run yet): the rope GPU tests (the 32-bit edge
# case among them), then probe 1 with bf16 half tables (what the table bytes cost against Liger's)
# and with full fp32 tables (the full-table path's warps, session 24's rule of 4 not yet swept on
# this kernel).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_rope.py tests/kernels/test_launch.py --tb=short 2>&1 | grep -v Warn | tail -30 | tee $OUT/r6_tests.log
TABLES=half_bf16 timeout 200 python3 benchmarks/probes/s29/rope_sweep.py 2>&1 | grep -v Warn | tee $OUT/r6_sweep_bf16.log
TABLES=full timeout 200 python3 benchmarks/probes/s29/rope_sweep.py 2>&1 | grep -v Warn | tee $OUT/r6_sweep_full.log
