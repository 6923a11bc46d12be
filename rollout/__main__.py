"""`python -m rollout --config FILE [--set key=value ...]`: serve anvil.v1.RolloutService."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from servicekit.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="rollout", description="Serve anvil.v1.RolloutService.")
    add_config_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace, model: tuple[str, str] | None = None) -> int:
    """Serve; `model` = (name, directory) is filled in by `anvil rollout --model NAME`."""
    from rollout.config import RolloutConfig
    from rollout.server import serve
    from servicekit.config import serve_from_arguments

    overrides = [f'model="{model[1]}"', f'model_name="{model[0]}"'] if model else []
    return serve_from_arguments("rollout", RolloutConfig, args, overrides, serve)


if __name__ == "__main__":
    sys.exit(main())
