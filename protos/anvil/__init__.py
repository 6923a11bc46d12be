"""Versioned anvil API packages; `v1` is the current contract."""
