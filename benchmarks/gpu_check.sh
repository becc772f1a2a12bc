#!/usr/bin/env bash
# The accelerator path: a build at the defaults (8,192 codes, 1,024 tokens per 256 px image) of a few thousand
# demo examples with ViT-B-32 (random weights, seeded: --clip_pretrained none) on --device cuda, printing each
# stage's examples/s and the Embed stage against a bare open_clip loop on the same GPU, then the determinism
# checks (CLIP embeddings twice; patch-VQ codes on the GPU vs the CPU). Tables go to $OUT (or /tmp/gpu_check).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine: 3,000 examples; under 8 minutes on an H100
#   bash benchmarks/gpu_check.sh --smoke    # the same steps on the CPU at a tiny size (24 examples, 256 codes)
#
# On a GPU the build is cut at 360 s by `timeout` and the checks at 90 s (the CPU smoke run gets 900 s and 300 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ "${1:-}" == "--smoke" ]]; then
  device=cpu
  limits=(900 300)
  size=(--examples 24 --embed_batch_size 16 --tokenize_batch_size 8 "--extra=--image_codebook_size=256")
else
  device=cuda
  limits=(360 90)
  size=(--examples 3000 --embed_batch_size 256 --tokenize_batch_size 64)
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here; --smoke runs the CPU check')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "== build at the defaults on $device"
timeout "${limits[0]}" python benchmarks/bench_defaults.py "${size[@]}" --clip_model ViT-B-32 --clip_pretrained none \
  --device "$device" --bare --workdir "$work" --out "$out/gpu_check.md" 2>&1 | grep -v '^\[cm3corpus progress\]'
echo "== determinism on $device"
timeout "${limits[1]}" python -m benchmarks.gpu_consistency --corpus "$work/corpus" --data "$(ls -d "$work"/data-*)" \
  --device "$device" 2>&1 | grep -v '^WARNING' | tee "$out/gpu_consistency.txt"
