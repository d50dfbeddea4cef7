# Session 32, run 5: run 3's diagnosis (dynamo made the second softcap, a float that changed between
# calls, a traced tensor: a data-dependent graph break at flex's call) and its fix (flex.attention
# compiles under specialize_float): the Gemma2 compile test (softcap 3), then the head-256 tiles
# test (softcap 50), in one process as in runs 2-4 (where the second failed).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 150 python3 -m pytest -q -s -m gpu --tb=short -p no:cacheprovider tests/models/test_flex_gpu.py -k "gemma2_under or head256" 2>&1 | grep "relative errors\|passed\|failed\|Error" | cut -c1-400 | tee $OUT/r5.log
