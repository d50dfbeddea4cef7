python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 60 python3 benchmarks/probes/s24/probe4.py 2>&1 | tee $OUT/probe4.log
timeout 280 python3 -m pytest -q -m gpu tests/models -p no:cacheprovider 2>&1 | tail -8 | tee $OUT/gpu_models.log
timeout 200 python3 scripts/bench_e2e.py --models llama3-8b-8l --shapes 8x4096 --variants ligerzoo --checkpointing off --out $OUT/e2e 2>&1 | tail -15 | tee $OUT/e2e.log
