#!/usr/bin/env bash
# Creates .venv/ with every dependency pinned (requirements.lock) and installs perceptclip into it.
# Idempotent: a rerun with an unchanged lock and pyproject only reinstalls the package itself.
#
#   scripts/setup.sh                     the environment
#   scripts/setup.sh --with-test-tools   also Debian's chromium (the report test renders HTML in it);
#                                        apt-get, so run as root, once per machine
set -euo pipefail
cd "$(dirname "$0")/.."

with_test_tools=0
for arg in "$@"; do
  case "$arg" in
    --with-test-tools) with_test_tools=1 ;;
    *) echo "setup: unknown option $arg (known: --with-test-tools)" >&2; exit 2 ;;
  esac
done

if [ "$with_test_tools" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: --with-test-tools installs chromium with apt-get: run as root (or: sudo apt-get install chromium)" >&2
    exit 1
  fi
  echo "setup: installing chromium (apt-get)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
"$PYTHON" -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 12), f"Python 3.11 or 3.12 needed, found {sys.version}"'

stamp=.venv/.perceptclip-lock
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned dependencies into .venv/ (several GB, a few minutes the first time)" >&2
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
  echo "$want" > "$stamp"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e ".[dev]"
echo "setup: ready (.venv/bin/perceptclip)" >&2
