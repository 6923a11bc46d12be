"""Anvil coordinator."""
