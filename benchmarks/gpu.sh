#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one command, on a machine with an NVIDIA GPU and the
# project set up (bash scripts/setup.sh). Nothing is downloaded: models have random weights.
#
#   bash benchmarks/gpu.sh [CPUS]          # CPUS: cores for decoding (default: all)
#
# 1. the GPU tests (device decode against the CPU path, bf16 against fp32);
# 2. ViT-L/14 at 224 alone, bf16, batch sizes 64..512 (target >= 3,500 images/s on one H100);
# 3. decoding alone, PIL against the GPU decoder;
# 4. the scoring job end to end from local shards of 512 px JPEGs, ViT-L/14, decoding on the CPUs and
#    then on the GPU (target >= 2,500 images/s on one H100 with 16 CPU cores), stage times first (on
#    4,000 images: one process); end to end on 100,000 images, so that what is decoded while the model
#    loads stays a small part of the run (stages.py warns otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
CPUS=${1:-$(nproc)}
py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -m pytest -q -m gpu tests
$py benchmarks/model_throughput.py --backbone ViT-L-14-quickgelu --batch-sizes 64,128,256,512 --seconds 10
$py benchmarks/decode_throughput.py --device cuda
$py benchmarks/stages.py --model random:ViT-L-14-quickgelu --images 4000 --shards 8 --cpus "$CPUS" --batch-size 256
$py benchmarks/stages.py --model random:ViT-L-14-quickgelu --images 100000 --shards 200 --cpus "$CPUS" --batch-size 256 \
    --skip-stages
$py benchmarks/stages.py --model random:ViT-L-14-quickgelu --images 100000 --shards 200 --cpus "$CPUS" --batch-size 256 \
    --skip-stages --decode device
