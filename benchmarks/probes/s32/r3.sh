# Session 32, run 3: why test_head256_tiles_are_as_exact_as_torchs failed in run 2 after the other
# flex tests (it passed alone in session 31's run 6): it alone, then after each earlier test, with
# dynamo's graph breaks and recompiles logged; three pytest processes side by side (compiles).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TORCH_LOGS="graph_breaks,recompiles"
P="timeout 200 python3 -m pytest -q -m gpu --tb=line -p no:cacheprovider tests/models/test_flex_gpu.py"
$P -k "head256" > $OUT/r3_alone.log 2>&1 &
$P -k "gemma2_under or head256" > $OUT/r3_gemma2.log 2>&1 &
$P -k "bf16_block or head256" > $OUT/r3_bf16.log 2>&1 &
timeout 200 python3 benchmarks/probes/s32/flex_lengths.py > $OUT/r3_lengths.log 2>&1 &
wait
for f in $OUT/r3_*.log; do echo "== $f"; grep -v "DEBUG\|^  warn\|Deprecat" $f | grep -i ": ok$\|Error:\|graph break\|recompil\|passed\|failed\|Error\|reason\|triggered" | cut -c1-400 | head -40; done
