# Session 32, run 1: session 31's r7.sh (every flex and fused-linear-loss GPU test; items 4-5's
# effect on the Gemma2 and Qwen2.5 4 x 2048 steps, ligerzoo then Liger) plus the Llama-3-8B
# 8 x 4096 pair (ligerzoo, Liger), each variant in its own process.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=200
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv | tee $OUT/r1_gpu.log
timeout 200 python3 -m pytest -q -m gpu tests/models/test_flex_gpu.py --tb=short -p no:cacheprovider 2>&1 | grep -v Warn | tail -5 | tee $OUT/r1_tests.log
timeout 150 python3 -m pytest -q -m gpu tests/kernels/test_fused_linear_cross_entropy.py tests/kernels/test_fused_linear_jsd.py --tb=short -p no:cacheprovider 2>&1 | grep -v Warn | tail -5 | tee -a $OUT/r1_tests.log
timeout 150 python3 scripts/bench_e2e.py --models gemma2-9b-4l,qwen2.5-7b-4l --shapes 4x2048 --checkpointing off --variants ligerzoo,liger --out $OUT/fam 2>&1 | grep "tok/s\|rate\|wall" | tee $OUT/r1_e2e.log
timeout 120 python3 scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096 --checkpointing off --variants ligerzoo,liger --out $OUT/llama 2>&1 | grep "tok/s\|rate\|wall" | tee -a $OUT/r1_e2e.log
