"""The anvil.v1 contract: generated stubs, Arrow batch schemas, errors and the shared gRPC plumbing."""
