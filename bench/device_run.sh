#!/usr/bin/env bash
# One script for the GPU box: set up, check every kernel against its twin, golden parity on
# CUDA, and the full-size benchmark. Results land in $OUT (device tool) or ./bench-out.
# Usage: bash bench/device_run.sh [smoke|full|load]
set -uo pipefail
MODE=${1:-smoke}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -d .golden ] && export DS4TP_GOLDEN=$PWD/.golden
log() { echo "== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"

if [ "$MODE" = smoke ]; then
  log "NCCL graph-capture probe"
  timeout 200 python3 bench/nccl_graph_probe.py 2>&1 | tail -3 | tee "$OUT/nccl_probe.txt"
  log "kernel tests (CUDA)"
  timeout 300 python3 -m pytest -q tests/test_kernels.py -k "not interpreter" 2>&1 | tail -15 | tee "$OUT/kernel_tests.txt"
  log "golden parity on CUDA, tiny-a, TP=1 and TP=2 (decode, static/graphs, prefill)"
  for tp in 1 2; do
    timeout 400 python3 tests/golden_eval.py --device cuda --tp $tp --model tiny-a --paths decode,static,prefill 2>&1 | tail -5 | tee -a "$OUT/golden_cuda.txt"
  done
  log "bench, 4 layers, quick"
  timeout 600 python3 -m ds4tp bench --layers 4 --tp 1,2 --quick --out "$OUT/bench_quick.json" 2>&1 | tail -20
elif [ "$MODE" = full ]; then
  log "kernels check (full-size shapes)"
  timeout 240 python3 bench/kernels_check.py --out "$OUT/kernels.json" 2>&1 | tail -30
  log "bench, 43 layers"
  timeout 900 python3 -m ds4tp bench --tp 1,2 --out "$OUT/bench.json" 2>&1 | tail -20
elif [ "$MODE" = load ]; then
  log "synth full (parallel) then load at TP=2"
  df -h /tmp | tail -1
  time python3 -m ds4tp synth --preset full --seed 0 --jobs 32 --out /tmp/full.gguf
  timeout 300 python3 -m ds4tp bench --tp 2 --layers 1 --quick --gguf /tmp/full.gguf --out "$OUT/load.json" 2>&1 | tail -5
fi
log done
