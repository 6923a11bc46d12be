"""Anvil rollout."""
