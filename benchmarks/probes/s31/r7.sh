# Prepared in session 31 for a later session (not run yet; about 9 minutes of device time):
# (1) every flex GPU test (run 5's 150 s limit cut them after 3 passes; the new head-256 test ran
# alone in run 6); (2) the Mixtral-8x7B 2-layer 4 x 2048 rows e2e.csv lacks: transformers eager and
# + torch.compile (Liger's Mixtral process took about 320 s in session 15, most before its first step).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=330
timeout 200 python3 -m pytest -q -m gpu tests/models/test_flex_gpu.py --tb=short -p no:cacheprovider 2>&1 | grep -v Warn | tail -5 | tee $OUT/r7_tests.log
timeout 340 python3 scripts/bench_e2e.py --models mixtral-8x7b-2l --shapes 4x2048 --checkpointing off --variants hf,compile --out $OUT/mix 2>&1 | grep -v Warn | tail -8 | tee $OUT/r7_mixtral.log
