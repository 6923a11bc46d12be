"""Mirrors of the wire schemas of Tinker's REST API (see protos/anvil/tinker/v1)."""
