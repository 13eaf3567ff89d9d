#!/usr/bin/env bash
# The README's first command: score demo images with a released PerceptCLIP model.
# MODEL may be a built-in name (fetched once from the Hugging Face hub, ~1.2 GB), a model directory
# or an s3:// URI.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-perceptclip-iqa}
.venv/bin/python scripts/make_demo_data.py demo-output/images >/dev/null
.venv/bin/perceptclip predict demo-output/images/*.jpg --model "$MODEL"
