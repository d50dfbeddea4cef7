# Session 28, run 7: probe 4 (rope with constexpr sizes and int32 head offsets at the shapes
# where the package's kernel trails Liger's).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0
timeout 200 python3 benchmarks/probes/s28/rope_const.py 2>&1 | grep -v Warn | tee $OUT/r7_rope_const.log
