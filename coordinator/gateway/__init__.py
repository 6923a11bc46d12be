"""The Tinker REST gateway: Tinker's `/api/v1` REST protocol over the anvil.v1 learner and rollout services,
so the official `tinker` SDK, unmodified, trains and samples on Anvil (`anvil serve`)."""
