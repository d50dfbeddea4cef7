# Session 30, run 2: the rope GPU tests and probe 1 with full fp32 tables under the new full-table
# warp rule (the rule's column), then the issue-5 recheck of the current code: ligerzoo and
# transformers + Liger Kernel at Llama-3-8B 8 layers 8 x 4096 (checkpointing off and on) and the
# Qwen2.5 / Gemma2 4 x 2048 shapes, each variant in its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_rope.py --tb=short 2>&1 | grep -v Warn | tail -4 | tee $OUT/r2_tests.log
TABLES=full timeout 160 python3 benchmarks/probes/s29/rope_sweep.py 2>&1 | grep -v Warn | tee $OUT/r2_sweep_full.log
timeout 130 python3 scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096 --variants ligerzoo,liger --checkpointing off,on --out $OUT/e2e 2>&1 | grep -v Warn | tail -14 | tee $OUT/r2_e2e.log
timeout 150 python3 scripts/bench_e2e.py --models qwen2.5-7b-4l,gemma2-9b-4l --shapes 4x2048 --variants ligerzoo,liger --checkpointing off --out $OUT/e2e2 2>&1 | grep -v Warn | tail -14 | tee -a $OUT/r2_e2e.log
