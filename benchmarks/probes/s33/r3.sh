# Session 33, run 3: selective layer checkpointing (apply_activation_checkpointing(every=k)) on
# the Llama-3-8B shape, 8 layers, 8 x 4096: none, every block, every 2nd, every 4th (ligerzoo,
# each in its own process, 10 steps after 3 warm-up steps); then the checkpointing GPU tests.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
run() { echo "== $1"; env $2 timeout 150 python3 scripts/bench_e2e.py --child --model llama3-8b-8l --variant ligerzoo \
  --batch 8 --seq-len 4096 $3 2>&1 | grep "RESULT\|Error" | cut -c1-400; }
{ run "no checkpointing" "" ""
  run "every block" "LZ_CKPT_EVERY=1" "--ckpt"
  run "every 2nd block" "LZ_CKPT_EVERY=2" "--ckpt"
  run "every 4th block" "LZ_CKPT_EVERY=4" "--ckpt"; } | tee $OUT/r3_ckpt_every.log
