"""Anvil learner."""
