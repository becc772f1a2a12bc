#!/usr/bin/env bash
# VQ-GAN tokenizing on a GPU: the stage against the batched bare loop, Chameleon's VQ-GAN shape at 512 px,
# in float32, bfloat16 and float16 (each also reports how many codes equal float32's).
#
#   bash benchmarks/gpu_vqgan.sh            # on a CUDA machine: 3 runs of 512 images, each capped at 150 s
#   bash benchmarks/gpu_vqgan.sh --smoke    # the same steps on the CPU with a tiny VQ-GAN (a minute)
#
# The whole script stays under 8 minutes: each run is cut at 150 s by `timeout`. JPEG decoding and
# LANCZOS resizing run on the CPU on both sides, so at 512 images the GPU figure is partly a CPU one.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--smoke" ]]; then
  device=cpu
  size=(--quick --images 16 --batch_size 8 --repeats 1)
else
  device=cuda
  size=(--images 512 --batch_size 64 --repeats 3)
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here; --smoke runs the CPU check')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
for dtype in float32 bfloat16 float16; do
  echo "== $device $dtype"
  timeout 150 python -m benchmarks.bench_vqgan --device "$device" --dtype "$dtype" "${size[@]}" 2>&1 | grep -v '^\[cm3corpus progress\]'
done
