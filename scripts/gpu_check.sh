#!/usr/bin/env bash
# Every CUDA path on one GPU, in under 10 minutes: the gpu-marked tests (FSDP2 on NCCL, the
# trainer in bf16 on CUDA, validators and the hf engine on CUDA, the vLLM engine and validator
# backend when vLLM is installed), then the scale bench's checkpoint and validation parts on the
# GPU. Run it whenever a GPU machine is lent, and put its figures in docs/scale.md.
#
# Usage: scripts/gpu_check.sh [RESULT.json]
#   writes RESULT-validation.json, RESULT-validation-profile.txt, RESULT-checkpoint.json
#   SWARMRL_GPU_MODEL  the bench's model: a preset, HF folder or id (default smollm2-135m; a
#                      machine cut off from the hub can use bench/random_model.py's folders)
# Exit status: 0 all ran and passed; 1 something failed; 2 no GPU; 3 passed without vLLM's tests.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/scale-gpu.json}"
model="${SWARMRL_GPU_MODEL:-smollm2-135m}"
export HF_HUB_OFFLINE=1
python - <<'PY' || { echo "gpu_check: no CUDA device visible to torch"; exit 2; }
import sys, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
sys.exit(0 if torch.cuda.is_available() else 1)
PY
markers="gpu"
if ! python -c "import vllm" 2>/dev/null; then
    echo "gpu_check: vLLM is not installed, so its gpu tests are left out (pip install 'swarmrl[vllm]')"
    markers="gpu and not vllm"
fi
failed=0
timeout 320 python -m pytest -m "$markers" -p no:cacheprovider tests/ || failed=1
# Each part under its own limit, each writing its own JSON as it ends: one slow part (the first
# H200 run's validation) must not cost the other's figures.
timeout 150 python bench/scale.py --device cuda --only validation --model "$model" \
    --profile "${out%.json}-validation-profile.txt" --json "${out%.json}-validation.json" || failed=1
timeout 130 python bench/scale.py --device cuda --quick --only checkpoint --model "$model" \
    --auto-steps 40 --json "${out%.json}-checkpoint.json" || failed=1
if [ "$failed" = 0 ] && [ "$markers" != "gpu" ]; then
    echo "gpu_check: passed, but without vLLM's tests"
    exit 3
fi
exit $failed
