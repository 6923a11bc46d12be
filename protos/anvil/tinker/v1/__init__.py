"""Generated stubs of Tinker's public protobuf wire schema (made by scripts/gen_protos.py; never edit them)."""
