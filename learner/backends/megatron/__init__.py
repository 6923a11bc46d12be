"""The Megatron-core learner backend (TP/PP/DP under torchrun); megatron-core is imported lazily."""
