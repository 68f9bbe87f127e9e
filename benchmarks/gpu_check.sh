#!/usr/bin/env bash
# The one prepared device check for a session lent a GPU (issue 5, "The GPU path"):
#   1. the CUDA capture path is correct (rows equal a CPU copy; no device sync on the training
#      thread, enforced with torch.cuda.set_sync_debug_mode("error")), SAE training on CUDA;
#   2. capture overhead on the GPU, the same variants as on CPU.
# Run it through the device tool from the repo root, e.g. with timeout_s=540:
#   bash benchmarks/gpu_check.sh        (results land in $OUT when the tool sets it)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pip install -q -e . 2>/dev/null || true
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1
"$PY" -m pytest tests/capture/test_gpu_capture.py tests/analysis/test_sae.py -q -k "cuda or gpu" 2>&1 | tee "$OUT/gpu_tests.log"
"$PY" benchmarks/capture_overhead.py --device cuda --variants a,b,c,d,f --rounds 20 --threads 4 \
    2>&1 | tee "$OUT/gpu_capture_overhead.log"
