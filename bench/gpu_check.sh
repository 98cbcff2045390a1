#!/usr/bin/env bash
# The GPU check: a bf16 LoRA and a bf16 full fine-tune of a ~0.5B-parameter decoder (Qwen2.5-0.5B's shape, built
# from its config, random weights) on synthetic tokens, each through `runner run` and as the same steps in a bare
# Accelerate script. Prints tokens/s of both and their ratio, MFU, peak GPU memory against the pre-flight estimate
# and the ONNX export time; the last line is one JSON object. Under 8 minutes on one H100 or H200.
#
#   bench/gpu_check.sh [--steps 30] [--keep DIR]          (PYTHON picks the interpreter; default python3)
#
# Where no CUDA device is visible it says so and measures nothing (exit 0, {"gpu": null, ...}).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU available on this machine; nothing was measured"
  echo '{"gpu": null, "skipped": "no CUDA GPU available"}'
  exit 0
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error HF_DATASETS_DISABLE_PROGRESS_BARS=1
exec "$PY" bench/gpu_check.py "$@"
