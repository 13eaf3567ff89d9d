#!/usr/bin/env bash
# The README's first command: score demo shards with a released PerceptCLIP model, then show the
# score quantiles. MODEL may be a built-in name (fetched once from the Hugging Face hub, ~1.2 GB), a
# model directory or an s3:// URI. On a machine that cannot reach the hub, a built-in name fails within
# seconds, saying how to fetch and convert the model elsewhere; MODEL=that-directory then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-perceptclip-iqa}
shards=$(.venv/bin/python scripts/make_demo_data.py demo-output/shards)
.venv/bin/perceptclip score --input "$shards" --output demo-output/scores --model "$MODEL"
.venv/bin/perceptclip quantiles --scores demo-output/scores
