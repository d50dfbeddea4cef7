# Session 27, run 5: after the host trims (cached launch plans, no views): the embedding GPU
# tests, its host timeline against Liger's, and its paired rows.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_embedding.py 2>&1 | tail -3 | tee $OUT/r5_tests.log
timeout 200 python3 benchmarks/probes/s27/emb_marks.py 8192 2>&1 | grep -v Warn | tee $OUT/r5_marks.log
PAIRED=1 timeout 200 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops embedding \
  --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r5_bench.log
rm -rf $OUT/bench/*.png
