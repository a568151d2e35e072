#!/usr/bin/env bash
# Sets up .venv with sharpen and the torch build this machine can use (CPU build when there is no GPU).
#
#   TORCH_VERSION   torch to install when none is present (default 2.13.0)
#   TORCH_INDEX_URL an index to take torch from, e.g. PyTorch's CPU-only index on a laptop
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip_quiet=(--quiet --disable-pip-version-check)

if ! python -c "import torch" >/dev/null 2>&1; then
  torch_spec="torch==${TORCH_VERSION:-2.13.0}"
  index_args=()
  [ -n "${TORCH_INDEX_URL:-}" ] && index_args=(--index-url "$TORCH_INDEX_URL")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing $torch_spec (CUDA build)"
  else
    # Installing torch first, pinned, is what keeps an unpinned dependency from pulling the CUDA stack.
    echo "setup: no GPU found, installing $torch_spec (CPU build where the index offers one)"
  fi
  pip install "${pip_quiet[@]}" "${index_args[@]}" "$torch_spec"
fi
pip install "${pip_quiet[@]}" -e ".[dev,eval,mlflow,tensorboard]"
python -c "import torch, launcher; print(f'setup: sharpen {launcher.__version__}, torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
