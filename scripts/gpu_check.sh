#!/usr/bin/env bash
# Every CUDA path on one GPU, in under 10 minutes: the gpu-marked tests (FSDP2 on NCCL, the
# trainer in bf16 on CUDA), then the scale bench on the GPU. Run it whenever a GPU machine is
# lent, and put its figures in docs/scale.md. Usage: scripts/gpu_check.sh [RESULT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/scale-gpu.json}"
export HF_HUB_OFFLINE=1
python - <<'PY' || { echo "gpu_check: no CUDA device visible to torch"; exit 2; }
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
sys.exit(0 if torch.cuda.is_available() else 1)
PY
failed=0
# The gpu marks include the vLLM ones on CUDA (the engine on LoRA versions, the vllm validator
# backend against the hf one: tests/trainer/test_validator_vllm.py); they need vLLM installed.
timeout 420 python -m pytest -m gpu -p no:cacheprovider tests/ || failed=1
timeout 170 python bench/scale.py --quick --device cuda --json "$out" || failed=1
exit $failed
