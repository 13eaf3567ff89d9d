#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one command, on a machine with an NVIDIA GPU, in under 10
# minutes. It installs nothing and downloads nothing (models have random weights). Two ways to run it:
#
#   bash benchmarks/gpu.sh [CPUS]            # after scripts/setup.sh: the Python of .venv/
#   PERCEPTCLIP_SITE=$PWD/offline-site bash benchmarks/gpu.sh [CPUS]
#                                            # in an unpacked scripts/offline_bundle.sh archive, with the
#                                            # node's own python3 (its torch) and the bundle's packages
#   bash benchmarks/gpu.sh --check           # the import check alone
#
# CPUS: cores for decoding (default: all). PYTHON overrides the interpreter. The import check comes
# first and names every missing module within seconds; then, without a CUDA device, it stops with
# "no CUDA device" (exit 3). Then, in this order, each step under its own time limit (a step that
# fails or runs out of time does not stop the next; the whole run stays under 10 minutes):
#
# 1. the GPU tests (device decode against the CPU path, bf16 against fp32);
# 2. ViT-L/14 at 224 alone, bf16, batch sizes 64..512 (target >= 3,500 images/s on one H100);
# 3. decoding alone, PIL against the GPU decoder;
# 4. the scoring job end to end from local shards of 512 px JPEGs, ViT-L/14, decoding on the CPUs and
#    then on the GPU (target >= 2,500 images/s on one H100 with 16 CPU cores), stage times first (on
#    4,000 images: one process); end to end on 100,000 images, so that what is decoded while the model
#    loads stays a small part of the run (stages.py warns otherwise).
#
# Everything printed also goes, line by line as it comes, to one file: $OUT/gpu-<time>.txt when OUT is
# set (the device machine's folder that comes back), else gpu-results/gpu-<time>.txt; it ends with a
# summary of each step's status and figures.
set -uo pipefail
cd "$(dirname "$0")/.."

check_only=0
[ "${1:-}" = "--check" ] && { check_only=1; shift; }
CPUS=${1:-$(nproc)}
if [ -n "${PERCEPTCLIP_SITE:-}" ]; then
  [ -d "$PERCEPTCLIP_SITE/ray" ] || { echo "gpu.sh: PERCEPTCLIP_SITE=$PERCEPTCLIP_SITE holds no ray/: not an offline bundle's offline-site folder" >&2; exit 2; }
  export PYTHONPATH="$(cd "$PERCEPTCLIP_SITE" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
  py=${PYTHON:-python3}
else
  py=${PYTHON:-.venv/bin/python}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
command -v "$py" >/dev/null || { echo "gpu.sh: no Python at $py: run scripts/setup.sh, or set PERCEPTCLIP_SITE to an offline bundle's offline-site folder (or PYTHON)" >&2; exit 2; }

# Seconds from the start by which every step has ended (timeout's 10 s grace included): under 10 min.
deadline=$((SECONDS + 575))
results=${OUT:-gpu-results}/gpu-$(date -u +%Y%m%dT%H%M%SZ).txt
mkdir -p "$(dirname "$results")"
say() { echo "$*" | tee -a "$results"; }
summary=()

# --- import check: everything the steps import, each tried on its own so that all missing ones are named
say "gpu.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ), python $py, results in $results"
timeout -k 5 60 "$py" - <<'EOF' 2>&1 | tee -a "$results"
import importlib, os, sys

modules = ["torch", "torchvision", "numpy", "pyarrow", "pandas", "PIL", "fsspec", "safetensors", "yaml",
           "click", "scipy", "pytest", "psutil", "ray", "ray.data", "open_clip", "webdataset", "braceexpand",
           "ftfy", "aiohttp", "s3fs", "perceptclip", "perceptclip.scoring.job", "perceptclip.model.scorer", "perceptclip.model.device_decode",
           "perceptclip.model.debug", "perceptclip.inputs.shards"]
missing, found = [], {}
for name in modules:
    try:
        found[name] = importlib.import_module(name)
    except Exception as e:                       # an ImportError, or a package that breaks on import
        missing.append(f"{name} ({type(e).__name__}: {e})")
print(f"python {sys.version.split()[0]} ({sys.executable})")
for name in ("torch", "torchvision", "ray", "open_clip", "pyarrow", "perceptclip"):
    if name in found:
        m = found[name]
        version = getattr(m, "__version__", "?")
        print(f"  {name} {version} from {os.path.dirname(m.__file__)}")
if "torch" in found:
    print(f"  torch built for CUDA {found['torch'].version.cuda}")
if missing:
    print("import check FAILED, missing or broken:\n  " + "\n  ".join(missing))
    print("(unpack the offline bundle and set PERCEPTCLIP_SITE to its offline-site folder, "
          "or run scripts/setup.sh for .venv/)")
    sys.exit(1)
print(f"import check: all {len(modules)} modules import")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || { say "gpu.sh: stopped: the import check failed (above)"; exit 1; }
[ "$check_only" = 1 ] && exit 0

# --- a CUDA device, before the first GPU step
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$results"
timeout -k 5 60 "$py" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) finds none; "
             "the GPU steps need one")
print(f"CUDA device: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, torch {torch.__version__}")
' 2>&1 | tee -a "$results"
[ "${PIPESTATUS[0]}" = 0 ] || { say "gpu.sh: stopped before the GPU steps: no CUDA device"; exit 3; }

# step NAME SECONDS COMMAND...: runs COMMAND under a time limit (at most what is left before the
# deadline), its output to the screen and the results file as it comes, and notes its status.
step() {
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    say "== $name: skipped, no time left"; summary+=("$name: skipped (no time left)"); return
  fi
  say "== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$results"
  local rc=${PIPESTATUS[0]} status
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMED OUT after $limit s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  say "== $name: $status in $((SECONDS - start)) s"
  summary+=("$name: $status")
}

gpu_tests=$(grep -rl --include='test_*.py' "mark.gpu" tests | sort | tr '\n' ' ')
vit=random:ViT-L-14-quickgelu
step "GPU tests" 75 "$py" -m pytest -q -p no:cacheprovider -m gpu $gpu_tests
step "ViT-L/14 alone" 75 "$py" benchmarks/model_throughput.py --backbone ViT-L-14-quickgelu \
  --batch-sizes 64,128,256,512 --seconds 5
# the same without the canonical padding: what calls of 256 crops would give instead of 64
step "ViT-L/14 alone, unpadded calls" 40 "$py" benchmarks/model_throughput.py --backbone ViT-L-14-quickgelu \
  --batch-sizes 64,256 --seconds 3 --model-batch 0
step "decoding alone" 45 "$py" benchmarks/decode_throughput.py --device cuda --seconds 5
step "stage times, 4,000 images" 90 "$py" benchmarks/stages.py --model $vit --images 4000 --shards 8 \
  --cpus "$CPUS" --batch-size 256
step "end to end, 100,000 images, CPU decode" 140 "$py" benchmarks/stages.py --model $vit --images 100000 \
  --shards 200 --cpus "$CPUS" --batch-size 256 --skip-stages
step "end to end, 100,000 images, GPU decode" 140 "$py" benchmarks/stages.py --model $vit --images 100000 \
  --shards 200 --cpus "$CPUS" --batch-size 256 --skip-stages --decode device

figures=$(grep -E "^[0-9]+ (passed|failed|skipped|errors?)|^batch +[0-9]+:|^model alone:|^crops against|^cpu path:|^decode_on_device:|^ratio:|^(model|all) +[0-9]|^end to end:" \
  "$results")
say "== summary ($SECONDS s)"
for line in "${summary[@]}"; do say "  $line"; done
while IFS= read -r line; do say "  $line"; done <<< "$figures"
[[ "${summary[*]}" != *"FAILED"* && "${summary[*]}" != *"TIMED OUT"* && "${summary[*]}" != *"skipped"* ]]
