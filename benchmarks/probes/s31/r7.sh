# Prepared in session 31 for a later session (not run yet; under 9 minutes of device time):
# (1) every flex GPU test (run 5's 150 s limit cut them after 3 passes; the new head-256 test ran
# alone in run 6) and the fused-linear loss GPU tests (the accumulator's first chunk now written
# with beta = 0: NOTES session 31 item 4); (2) the effect of items 4 and 5 (the model's 1 / count
# folded into the fused loss) on the step: Gemma2 and Qwen2.5 at 4 x 2048, ligerzoo then Liger
# (predicted: Gemma2 +1.3%, Qwen2.5 +1.0% over run 5 / session 30).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=330
timeout 200 python3 -m pytest -q -m gpu tests/models/test_flex_gpu.py --tb=short -p no:cacheprovider 2>&1 | grep -v Warn | tail -5 | tee $OUT/r7_tests.log
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_fused_linear_cross_entropy.py tests/kernels/test_fused_linear_jsd.py --tb=short -p no:cacheprovider 2>&1 | grep -v Warn | tail -5 | tee -a $OUT/r7_tests.log
timeout 150 python3 scripts/bench_e2e.py --models gemma2-9b-4l,qwen2.5-7b-4l --shapes 4x2048 --checkpointing off --variants ligerzoo,liger --out $OUT/fam 2>&1 | grep "tok/s\|rate" | tee $OUT/r7_e2e.log
