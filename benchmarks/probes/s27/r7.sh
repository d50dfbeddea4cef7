# Session 27, run 7 (final check): every kernel GPU test, then embedding's paired rows again and
# its host timeline at 4096 tokens.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 330 python3 -m pytest -q -m gpu tests/kernels 2>&1 | tail -4 | tee $OUT/r7_tests.log
PAIRED=1 timeout 120 python3 scripts/bench_kernels.py --variants ligerzoo,liger --ops embedding \
  --tokens 4096,8192,16384 --out $OUT/bench 2>&1 | grep -v Warn | tee $OUT/r7_bench.log
rm -rf $OUT/bench/*.png
timeout 90 python3 benchmarks/probes/s27/emb_marks.py 4096 2>&1 | grep -v Warn | tee $OUT/r7_marks.log
