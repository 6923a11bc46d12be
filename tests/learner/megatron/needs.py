"""Skip Megatron tests where megatron-core is absent - unless ANVIL_EXPECT_MEGATRON=1 (CI sets it after
`scripts/setup.sh --dev` installed the `megatron` extra), where its absence is a failure, not a skip."""

from __future__ import annotations

import importlib.util
import os

import pytest


def require_megatron() -> None:
    if importlib.util.find_spec("megatron") and importlib.util.find_spec("megatron.core"):
        return
    if os.environ.get("ANVIL_EXPECT_MEGATRON") == "1":
        pytest.fail("ANVIL_EXPECT_MEGATRON=1 but megatron-core is not installed (run scripts/setup.sh --dev)")
    pytest.skip("megatron-core is not installed (pip install -e '.[megatron]')", allow_module_level=True)
