#!/bin/bash
# On the lent GPU host (never in CI): install vLLM's CUDA build from the offline bundle (parts already kept
# by ../shared/gpu/store_part.sh), install thaw itself, make the random-weight models, then run "$@".
# Only the bundle's location is set here; whatever vLLM needs set, thaw sets (thaw/vllm_platform.py).
# Carried: .gpu/shared (a copy of ../shared/gpu) and .gpu/tok (the demo model's config and tokenizer).
set -uo pipefail
G=${THAW_GPU:-$HOME/thaw-gpu}
[ -d "$G/site/vllm" ] || bash .gpu/shared/install.sh || exit 1
export PYTHONPATH=$G/site PATH=$G/site/bin:$PATH PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import thaw.eventing" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
M=${THAW_GPU_MODELS:-$HOME/thaw-models}
for size in ${THAW_GPU_SIZES:-small 8b}; do
  [ -f "$M/$size/config.json" ] && ls "$M/$size"/*.safetensors >/dev/null 2>&1 ||
    python3 .gpu/shared/make_model.py --size $size --tok .gpu/tok --out "$M/$size" || exit 1
done
export THAW_GPU_SMALL_MODEL=$M/small THAW_GPU_8B_MODEL=$M/8b
"$@"
