"""The packages import without the heavy optional engines, and the CLI parses without importing torch."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_packages_import_without_vllm_or_megatron():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('vllm', 'megatron'):\n"
        "            raise ImportError(f'{name} is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import protos, learner, rollout, coordinator\n"
        "import protos.rpc, protos.arrow_schemas, coordinator.models, coordinator.cli\n"
        "print('ok')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_help_lists_commands_without_importing_heavy_modules():
    """`anvil --help` must be instant: parsing may not import torch, transformers or grpc."""
    code = (
        "import sys\n"
        "from coordinator.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'grpc', 'pyarrow') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    for command in ("models", "smoke"):
        assert command in result.stdout


def test_anvil_console_script_is_installed():
    import shutil
    from pathlib import Path

    script = Path(sys.executable).parent / "anvil"
    assert script.exists() or shutil.which("anvil"), "pip install -e . should install the anvil script"
    result = subprocess.run([str(script), "models", "list"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "anvil-tiny" in result.stdout and "anvil-small" in result.stdout
