#!/usr/bin/env bash
# The test suite, as CI runs it: real ranks on gloo, real DeepSpeed/FSDP2/PEFT, W&B offline.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=offline WANDB_SILENT=true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec python -m pytest -q --durations=20 "$@"
