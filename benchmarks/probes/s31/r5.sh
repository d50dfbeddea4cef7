# Session 31, run 5: flex_attention's tiles for Gemma2's 256-feature heads. (1) The probe's second
# set of options around run 4's best; (2) the flex GPU tests with the options the model now passes
# (flex.SM90_HEAD256_OPTIONS); (3) Gemma2-9B 4 layers 4 x 2048, ligerzoo with torch's default tiles
# (LZ_FLEX_DEFAULTS=1), with the shipped options, then transformers + Liger Kernel, each in its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=200
SET=2 timeout 200 python3 benchmarks/probes/s31/flex_d256.py 2>&1 | grep -v Warn | tee $OUT/r5_flex.log
timeout 150 python3 -m pytest -q -m gpu tests/models/test_flex_gpu.py --tb=short 2>&1 | grep -v Warn | tail -5 | tee $OUT/r5_tests.log
E="python3 scripts/bench_e2e.py --models gemma2-9b-4l --shapes 4x2048 --checkpointing off"
LZ_FLEX_DEFAULTS=1 timeout 80 $E --variants ligerzoo --out /tmp/a 2>&1 | grep "tok/s\|rate" | sed 's/^/torch defaults: /' | tee $OUT/r5_e2e.log
timeout 130 $E --variants ligerzoo,liger --out $OUT/e2e 2>&1 | grep "tok/s\|rate" | tee -a $OUT/r5_e2e.log
