"""Generated stubs of the anvil.v1 contract (made by scripts/gen_protos.py; never edit them by hand)."""
