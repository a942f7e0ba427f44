#!/usr/bin/env bash
# The GPU checks, in one run of at most 8 minutes on one GPU (run it whenever a GPU is lent; the test
# suite never depends on it):
#   1. train-step time of every method on PreAct-ResNet-18 (32x32, batch 128), float32 and mixed_float16,
#      each with and without XLA (jit_compile), as ratios to natural training and to PGD-10;
#   2. the standard attack ensemble's throughput on 1,000 Fashion-MNIST test images (small CNNs).
# Writes benchmarks/gpu_check_<date>.txt.   Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT="benchmarks/gpu_check_$(date +%Y%m%d).txt"
export TF_CPP_MIN_LOG_LEVEL=2
# No GPU visible to TensorFlow means CPU timings under a GPU file name: refuse instead. (The lent H200
# image of 2026-11-29 had no TensorFlow and only CUDA 13 libraries, which TF 2.21 cannot load.)
if ! "$PY" -c "import sys, tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); print('TensorFlow', tf.__version__, 'sees', gpus); sys.exit(0 if gpus else 1)"; then
  echo "gpu_check.sh: TensorFlow ($PY) sees no GPU; install tensorflow[and-cuda] (CUDA 12 libraries) where a GPU is, or set PY" >&2
  exit 1
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  for precision in float32 mixed_float16; do
    timeout 150 "$PY" benchmarks/step_time.py --archs=preact_resnet18 --batch=128 --rounds=10 --jit \
      --mixed_precision="$precision" --no_json || echo "step_time $precision: exit $?"
  done
  timeout 150 "$PY" benchmarks/eval_speed.py --num_examples=1000 --epochs=1 || echo "eval_speed: exit $?"
} 2>&1 | grep -v "^WARNING: All log messages\|^I0000\|^W0000" | tee "$OUT"
echo "written to $OUT"
