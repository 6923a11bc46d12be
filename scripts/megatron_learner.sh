#!/usr/bin/env bash
# Launch the Megatron learner on this node with torchrun: one rank per GPU (or tp*pp*dp ranks on CPU).
# Rank 0 serves anvil.v1.LearnerService and prints `LISTENING host:port`; the other ranks follow it.
#   bash scripts/megatron_learner.sh --config configs/learner-megatron.toml [--set backend.tp=2 ...]
# TP/PP/DP come from the config (backend.tp / backend.pp / backend.dp). Environment:
#   PYTHON (default .venv/bin/python), NPROC_PER_NODE (override the rank count), and for several nodes
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (scripts/megatron_learner.slurm sets them).
# On CUDA: NCCL, bf16 autocast, the Transformer Engine layer spec when it is installed, fused kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
NNODES=${NNODES:-1}
export NNODES
NPROC=${NPROC_PER_NODE:-$("$PYTHON" -m learner.backends.megatron.world_size "$@")}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" = 1 ]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
              --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
              --rdzv_id "${RDZV_ID:-anvil-learner}")
fi
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node "$NPROC" \
  -m learner --set 'backend.type="megatron"' "$@"
