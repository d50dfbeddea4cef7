# Session 31, run 3: where Gemma2-9B's 4 x 2048 step goes, ligerzoo against transformers +
# torch.compile (run 2: compile 49,403 tokens/s at 35.80 GiB against session 30's ligerzoo 46,665
# at 17.45), one profiled step each after the timed ones.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 SPAWN_TIMEOUT=200
E="python3 scripts/bench_e2e.py --models gemma2-9b-4l --shapes 4x2048 --checkpointing off"
STEPS=4 WARMUP=2 PROFILE=40 timeout 100 $E --variants ligerzoo --out /tmp/a > $OUT/r3_gemma2_ligerzoo.log 2>&1
STEPS=4 WARMUP=2 PROFILE=40 timeout 150 $E --variants compile --out /tmp/b > $OUT/r3_gemma2_compile.log 2>&1
grep "tok/s\|GPU span" $OUT/r3_*.log
