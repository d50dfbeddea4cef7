# Session 33, run 4: gpu_smoke.py (this session's from_hf / generate / checkpointing changes on
# the GPU), then the flex block-mask GPU test for llama (from_hf(device="cuda") against
# transformers).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu3/whl/*.whl 2>&1 | grep -v "already exists" | tail -1
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/probes/s33/gpu_smoke.py 2>&1 | grep -v "Warn\|warn(\|Writing" | tee $OUT/r4_gpu_smoke.log
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider "tests/models/test_flex_gpu.py::test_block_masks_match_transformers_on_cuda[llama]" 2>&1 | tail -2 | tee -a $OUT/r4_gpu_smoke.log
