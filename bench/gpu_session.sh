#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): install carried wheels, then run the GPU checks and
# benchmarks, each under its own time limit, logs and JSON into $OUT. Usage: bash bench/gpu_session.sh STAGE...
# Stages: versions, smoke (bench/gpu_smoke.py), memory (bench/memory_check.py), bench (bench/bench_gpu.py
# quick), bench-full (the issue-7 figures). The machine has no network: missing packages travel as wheels
# in .whl/ (see /work/.library/device/README.md).
set -u
OUT=${OUT:-/tmp/sharpen-gpu-out}
mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}  # run from a copy of the tree: WHEELS=../.whl
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >"$OUT/pip.log" 2>&1 || { tail -5 "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SHARPEN_GPU_WORK=${SHARPEN_GPU_WORK:-/tmp/sharpen-gpu}
stage() {  # stage NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t)) s"; tail -${TAIL:-25} "$OUT/$name.log"
}
for s in "$@"; do
  case $s in
    versions) python3 -c "
import torch, transformers, peft, datasets, pydantic, pyarrow
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
for m in (transformers, peft, datasets, pydantic, pyarrow): print(m.__name__, m.__version__)
try:
    import deepspeed; print('deepspeed', deepspeed.__version__)
except Exception as e: print('deepspeed: not importable:', e)
try:
    import flash_attn; print('flash_attn', flash_attn.__version__)
except Exception as e: print('flash_attn: no')
" 2>&1 | grep -v Warning; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv ;;
    smoke) stage smoke ${SMOKE_S:-300} python3 bench/gpu_smoke.py --work-dir "$SHARPEN_GPU_WORK/smoke" --json-out "$OUT/gpu-smoke.json" ${SMOKE_ARGS:-};
           (cd "$SHARPEN_GPU_WORK/smoke" && tar czf "$OUT/smoke-logs.tgz" *.log 2>/dev/null) ;;
    memory) stage memory ${MEMORY_S:-240} python3 bench/memory_check.py --json-out "$OUT/memory-check.json" ${MEMORY_ARGS:-} ;;
    bench) stage bench ${BENCH_S:-300} python3 bench/bench_gpu.py --work-dir "$SHARPEN_GPU_WORK/bench" --json-out "$OUT/bench-gpu.json" ${BENCH_ARGS:---steps 16 --skip 4 --repeats 1} ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
