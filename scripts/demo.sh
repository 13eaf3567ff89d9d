#!/usr/bin/env bash
# The README's first command: score demo shards with a released PerceptCLIP model, then show the
# score quantiles. MODEL may be a built-in name (fetched once from the Hugging Face hub, ~1.2 GB), a
# model directory or an s3:// URI.
#
# Without MODEL, the demo fetches perceptclip-iqa; on a machine that cannot reach the hub it says so in
# one line (and how to get the weights), then shows the job with the built-in debug model instead, whose
# random weights give scores that mean nothing. With MODEL set, a model that cannot be had fails, saying
# how to fetch and convert it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${MODEL:-}" ]; then
  MODEL=perceptclip-iqa
  if ! why=$(.venv/bin/python -c 'from perceptclip.model.reference import resolve_model
resolve_model("perceptclip-iqa")' 2>&1); then
    echo "demo: the released weights cannot be fetched here, so the demo scores with the built-in debug model" \
         "(perceptclip-debug: random weights, its scores mean nothing). To get the real ones: $(echo "$why" | tail -1)" >&2
    MODEL=perceptclip-debug
  fi
fi
shards=$(.venv/bin/python scripts/make_demo_data.py demo-output/shards)
# one output per model: a rerun with another model never mixes two models' scores in one column
scores=demo-output/scores-$(basename "${MODEL%/}")
.venv/bin/perceptclip score --input "$shards" --output "$scores" --model "$MODEL"
.venv/bin/perceptclip quantiles --scores "$scores"
if [ "$MODEL" = perceptclip-debug ]; then
  echo "demo: scored with the debug model (perceptclip-debug): its scores mean nothing; run MODEL=perceptclip-iqa" \
       "bash scripts/demo.sh where the hub can be reached, or MODEL=path/to/model with a converted release" >&2
fi
