#!/usr/bin/env bash
# Set up Anvil in ./.venv (created when missing). Idempotent: re-running only installs what changed.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh --dev    # plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: on these machines pip takes the CPU wheel from disk.
.venv/bin/python -m pip install --quiet -e ".${extras}"
