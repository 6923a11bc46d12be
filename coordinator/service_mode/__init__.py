"""Service mode, Fireworks-style: RLOR trainer jobs, deployments and hot-load on the `anvil serve` port,
so the unmodified `fireworks-ai` training SDK drives full-parameter RL on Anvil."""
