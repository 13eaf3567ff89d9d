#!/usr/bin/env bash
# Checks here, without a GPU, that the offline bundle (scripts/offline_bundle.sh) runs on the GPU node
# we expect (DESIGN.md, "GPU nodes we can expect"): Python 3.12 with torch 2.11 and the node's other
# packages, and nothing of this project's own dependencies.
#
#   scripts/check_node_versions.sh [ARCHIVE]     # default: builds the bundle from the committed HEAD
#
# 1. a scratch Python 3.12 environment with the node's packages only (NODE_ENV, default /tmp/node312;
#    built once, a few GB, a few minutes; rebuilt when the list below changes);
# 2. the bundle, unpacked in a temporary folder;
# 3. every runtime requirement of the bundle's packages is met by the bundle or by the node's packages
#    (ray's with its `data` extra), and the bundle holds no package the node already has, unless a
#    bundled package refuses the node's version and the node's packages accept the bundle's;
# 4. `benchmarks/gpu.sh --check` (the import check) passes;
# 5. `benchmarks/gpu.sh` passes the import check and stops with "no CUDA device" (exit 3);
# 6. a tiny CPU scoring run end to end (benchmarks/stages.py: the tiny model, a local Ray cluster);
# 7. the quick tests (-m "not slow and not gpu") on these versions; a test that needs a test-only tool
#    the node does not have (moto, hypothesis, pytest-timeout) is reported as skipped, not failed.
# Each check runs even when an earlier one failed; the exit status is 0 only when all pass.
set -uo pipefail
archive=${1:+$(realpath "$1")}
cd "$(dirname "$0")/.."
repo=$PWD

env_dir=${NODE_ENV:-/tmp/node312}
node_packages=("torch==2.11.*" "torchvision==0.26.*" numpy pyarrow pandas pillow fsspec safetensors
               huggingface_hub pyyaml click scipy timm transformers peft pytest psutil)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
check() {                                  # check NAME COMMAND...: runs it, notes a failure, goes on
  local name=$1; shift
  echo "== $name"
  local start=$SECONDS
  if "$@"; then echo "== $name: ok ($((SECONDS - start)) s)"
  else echo "== $name: FAILED ($((SECONDS - start)) s)"; failed+=("$name"); fi
}

# 1. the node's packages, nothing else
if [ "$(cat "$env_dir/.node-packages" 2>/dev/null)" != "${node_packages[*]}" ]; then
  python312=$(python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null \
              || ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
  [ -n "$python312" ] || { echo "check_node_versions: no Python 3.12 (install one, e.g. pyenv install 3.12)" >&2; exit 1; }
  echo "check_node_versions: building $env_dir (${node_packages[*]}): a few minutes" >&2
  rm -rf "$env_dir"
  "$python312" -m venv "$env_dir"
  nice -n 19 "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check "${node_packages[@]}" || exit 1
  echo "${node_packages[*]}" > "$env_dir/.node-packages"
fi
py=$env_dir/bin/python
"$py" -c 'import sys, torch, torchvision; print(f"node: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}")'

# 2. the bundle
if [ -z "$archive" ]; then
  bash scripts/offline_bundle.sh 3.12 "$work/dist" || exit 1
  archive=$(ls "$work"/dist/*.tar.xz)
fi
tar -xJf "$archive" -C "$work" || exit 1
cd "$work/perceptclip"
head -2 OFFLINE-BUNDLE.txt
site=$PWD/offline-site
# the node's python3 on PATH, as gpu.sh finds it there; OUT unset: results stay in this temporary folder
node=(env -u OUT PATH="$env_dir/bin:$PATH")

# 3. requirements met, nothing shadowed
requirements() {
  PYTHONPATH=$site "$py" - "$site" <<'EOF'
import importlib.metadata as md
import re
import sys

from packaging.requirements import Requirement

site = sys.argv[1]
extras = {"ray": {"data"}}                     # the scoring job uses Ray Data
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
node = list(md.distributions(path=[p for p in sys.path if p != site]))
node_has = {norm(d.metadata["Name"]): d.version for d in node}
bundle = list(md.distributions(path=[site]))


def needs(dists, name):
    """The requirements on ``name`` of ``dists`` (markers for extras left out)."""
    return [r for d in dists for r in map(Requirement, d.requires or [])
            if norm(r.name) == name and not r.marker]


problems = []
for dist in bundle:
    name = norm(dist.metadata["Name"])
    if name in node_has:
        # carried on purpose only where a bundled package refuses the node's version, and every package
        # of the node that needs it accepts the bundle's
        refused = [r for r in needs(bundle, name) if not r.specifier.contains(node_has[name], prereleases=True)]
        unmet = [r for r in needs(node, name) if not r.specifier.contains(dist.version, prereleases=True)]
        if not refused or unmet:
            problems.append(f"{name} is in the bundle and on the node: the bundle's copy shadows the node's"
                            + (f" ({', '.join(map(str, unmet))} on the node)" if unmet else ""))
    for req in map(Requirement, dist.requires or []):
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras.get(name, set()) | {""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{name} needs {req}: neither the bundle nor the node has it")
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"{name} needs {req}: {have} is there")
print("\n".join(problems) or "every requirement is met, by the bundle or by the node's packages")
sys.exit(1 if problems else 0)
EOF
}
check "requirements of the bundle's packages" requirements

# 4, 5. gpu.sh: the import check, then the stop before the first GPU step
check "gpu.sh --check (import check)" "${node[@]}" PERCEPTCLIP_SITE="$site" bash benchmarks/gpu.sh --check
no_cuda_stop() {
  "${node[@]}" PERCEPTCLIP_SITE="$site" bash benchmarks/gpu.sh > "$work/gpu.log" 2>&1
  local rc=$?
  cat "$work/gpu.log"
  [ "$rc" = 3 ] && grep -q "no CUDA device" "$work/gpu.log"
}
check "gpu.sh stops with 'no CUDA device' (exit 3)" no_cuda_stop

# 6. the scoring job on CPU through the bundle's ray, open_clip and webdataset
check "tiny CPU scoring run (benchmarks/stages.py)" "${node[@]}" PYTHONPATH="$site" timeout -k 10 600 \
  "$py" benchmarks/stages.py --images 64 --shards 2 --cpus 2 --batch-size 16

# 7. the quick tests. The plugin turns "No module named X" for a test-only tool the node lacks into a skip.
mkdir -p "$work/plugin"
cat > "$work/plugin/node_absent_tools.py" <<'EOF'
import re

import pytest

ABSENT = {"moto", "hypothesis", "pytest_timeout"}


def _absent(text: str) -> str | None:
    m = re.search(r"No module named '([\w.]+)'", text)
    return m[1] if m and m[1].split(".")[0] in ABSENT else None


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    name = report.failed and _absent(str(report.longrepr))
    if name:
        report.outcome, report.longrepr = "skipped", (str(collector.path), 0, f"needs {name}: not on the node")
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    name = call.excinfo is not None and _absent(str(call.excinfo.value))
    if name:
        report.outcome, report.longrepr = "skipped", (str(item.path), item.location[1] or 0, f"needs {name}: not on the node")
    return report
EOF
check "quick tests on the node's versions" "${node[@]}" PYTHONPATH="$site:$work/plugin" timeout -k 10 1800 \
  "$py" -m pytest -q -p no:cacheprovider -p node_absent_tools -m "not slow and not gpu" \
    --deselect tests/test_architecture.py::test_ruff_finds_nothing_on_the_tree

cd "$repo"
if [ ${#failed[@]} -gt 0 ]; then
  echo "check_node_versions: FAILED: ${failed[*]}"; exit 1
fi
echo "check_node_versions: all checks passed"
