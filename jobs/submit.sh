#!/usr/bin/env bash
# Submit a scoring run to an existing Ray cluster (KubeRay, `ray up`, Slurm, ...) with `ray job submit`.
# The cluster's nodes run the perceptclip image (see Dockerfile), so nothing is uploaded with the job.
#
#   RAY_ADDRESS=http://ray-head:8265 jobs/submit.sh
#
# The S3 endpoint and credentials come from the nodes' environment (AWS_* variables or an instance
# role); they are never passed on this command line.
set -euo pipefail

: "${RAY_ADDRESS:?set RAY_ADDRESS to the Ray dashboard address, e.g. http://ray-head:8265}"

ray job submit --address "$RAY_ADDRESS" -- \
  perceptclip score \
    --config /opt/perceptclip/configs/score.yaml \
    --input 's3://example-bucket/shards/shard-{000000..000999}.tar' \
    --output s3://example-bucket/scores \
    --model perceptclip-iqa --model perceptclip-memorability --model perceptclip-emotion
