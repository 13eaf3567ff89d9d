#!/usr/bin/env bash
# Builds, on a machine with a package index, ONE archive that carries this project to a GPU node that
# has its own PyTorch and no network (docs/benchmarks.md, "GPU figures"; DESIGN.md, "GPU nodes we can
# expect"): the project's code at the committed HEAD, and the packages such a node lacks, unpacked into
# one folder for PYTHONPATH.
#
#   scripts/offline_bundle.sh PYTHON_VERSION [OUT_DIR]     # e.g. 3.12; OUT_DIR defaults to dist/
#
# On the node:
#   tar -xJf perceptclip-offline-py3.12-<commit>.tar.xz && cd perceptclip
#   PERCEPTCLIP_SITE=$PWD/offline-site bash benchmarks/gpu.sh
#
# What is in it:
#   perceptclip/                 `git archive HEAD`: committed code only (uncommitted edits are listed
#                                and left out, so the archive's name says exactly what ran)
#   perceptclip/offline-site/    ray (Ray Data; no Java jars, dashboard web client, rllib, tune, serve
#                                or ray.llm), open_clip_torch, webdataset, braceexpand, ftfy, and the
#                                runtime dependencies of those that the node lacks; `perceptclip` there
#                                is a link to ../pipeline/perceptclip, so the package imports without installing
#   perceptclip/OFFLINE-BUNDLE.txt   commit, Python version, the packages and their versions
#
# Not in it: what the node has (torch, torchvision, triton, numpy, pyarrow, pandas, pillow, fsspec,
# safetensors, huggingface_hub, pyyaml, click, scipy, timm, transformers, peft, pytest, psutil and
# their own dependencies), and what only other commands need: Ray Tune (so `perceptclip train` does not
# run from the bundle), moto and hypothesis (CPU-only tests).
# Versions are the ones requirements.lock pins; wheels are for CPython PYTHON_VERSION on x86-64 Linux.
set -euo pipefail
[ $# -ge 1 ] && [[ "$1" =~ ^3\.[0-9]+$ ]] || { echo "usage: $0 PYTHON_VERSION [OUT_DIR]   (e.g. 3.12)" >&2; exit 2; }
pyver=$1
out=$(realpath -m "${2:-$(dirname "$0")/../dist}")
cd "$(dirname "$0")/.."
abi=cp${pyver/./}

# What the node lacks. The first line is what the benchmarks and the GPU tests import; the others are
# their runtime dependencies (Requires-Dist) that neither the node's packages nor their dependencies
# provide: ray needs jsonschema, msgpack, protobuf and requests (ray[data] adds numpy, pandas, pyarrow
# and fsspec: all on the node); open_clip_torch needs ftfy; webdataset braceexpand. The node reads images
# over https and from an S3-compatible store too: fsspec's HTTP filesystem needs aiohttp, S3 needs s3fs
# (aiobotocore, botocore); without them every such image would fail one by one. botocore needs
# python-dateutil < 3, and a node with a recent pandas has 4.x: the bundle carries 2.x (which pandas
# accepts too) and its six.
# scripts/check_node_versions.sh checks this list against a Python with only the node's packages.
packages=(
  ray open_clip_torch webdataset braceexpand ftfy
  wcwidth
  jsonschema attrs referencing rpds-py jsonschema-specifications
  msgpack protobuf
  requests urllib3 certifi charset-normalizer
  aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl
  s3fs aiobotocore botocore jmespath aioitertools wrapt
  python-dateutil six
)
# Parts of ray (and of open_clip_torch's wheel) that neither the scoring job nor the GPU tests import.
prune=(
  ray/jars ray/dashboard/client/build ray/rllib ray/tune ray/serve ray/llm
  open_clip_train bin
)

pins=()
for p in "${packages[@]}"; do
  # requirements.lock spells names as their projects do (open_clip_torch, PyYAML): compare normalised
  pin=$(awk -v want="$p" -F'==' '{n=tolower($1); gsub(/[-_.]+/, "-", n); w=tolower(want); gsub(/[-_.]+/, "-", w)}
                                  n == w {print; exit}' requirements.lock)
  [ -n "$pin" ] || { echo "offline_bundle: $p is not pinned in requirements.lock" >&2; exit 1; }
  pins+=("$pin")
done

commit=$(git rev-parse --short=12 HEAD)
changed=$(git status --porcelain | wc -l)
if [ "$changed" -gt 0 ]; then
  echo "offline_bundle: $changed uncommitted change(s) are NOT in the bundle (it holds commit $commit):" >&2
  git status --porcelain | sed 's/^/  /' >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/perceptclip
site=$root/offline-site

git archive --format=tar --prefix=perceptclip/ HEAD | tar -x -C "$work"

platform=(--only-binary=:all: --python-version "$pyver" --implementation cp --abi "$abi"
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
echo "offline_bundle: downloading ${#pins[@]} wheels for CPython $pyver" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps "${platform[@]}" -d "$work/wheels" "${pins[@]}"
# pip unpacks the wheels as an install would (executable bits of ray's raylet and gcs_server kept)
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-index --no-deps --no-compile \
  "${platform[@]}" --target "$site" "$work"/wheels/*.whl
for p in "${prune[@]}"; do rm -rf "${site:?}/$p"; done
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +
ln -s ../pipeline/perceptclip "$site/perceptclip"

{
  echo "perceptclip offline bundle"
  echo "commit: $(git rev-parse HEAD) ($(git log -1 --format=%cd --date=iso-strict HEAD))"
  [ "$changed" -gt 0 ] && echo "uncommitted changes at build time, not included: $changed"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) for CPython $pyver, x86-64 Linux (manylinux2014 and later)"
  echo "use: PERCEPTCLIP_SITE=\$PWD/offline-site bash benchmarks/gpu.sh   (in this folder)"
  echo "packages in offline-site/ (pruned: ${prune[*]}):"
  printf '  %s\n' "${pins[@]}"
} > "$root/OFFLINE-BUNDLE.txt"

mkdir -p "$out"
archive=$out/perceptclip-offline-py$pyver-$commit.tar.xz
echo "offline_bundle: compressing $(du -sh "$root" | cut -f1) (xz -9, a minute or two)" >&2
tar -C "$work" --sort=name --owner=0 --group=0 --numeric-owner -cf - perceptclip | xz -9 -T0 > "$archive.part"
mv "$archive.part" "$archive"

bytes=$(stat -c %s "$archive")
echo "offline_bundle: $archive: $((bytes / 1000000)).$(((bytes % 1000000) / 100000)) MB ($bytes bytes)"
if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
  echo "offline_bundle: over 64 MiB, more than one transfer to the node can carry" >&2; exit 1
elif [ "$bytes" -gt 60000000 ]; then
  echo "offline_bundle: warning: over the 60 MB target" >&2
fi
