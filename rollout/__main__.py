"""`python -m rollout --config FILE [--set key=value ...]`: serve anvil.v1.RolloutService."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from protos.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="rollout", description="Serve anvil.v1.RolloutService.")
    add_config_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace, model: tuple[str, str] | None = None) -> int:
    """Serve; `model` = (name, directory) is filled in by `anvil rollout --model NAME`."""
    from protos.config import load_config
    from protos.errors import InvalidArgument
    from rollout.config import RolloutConfig
    from rollout.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [f'model="{model[1]}"', f'model_name="{model[0]}"'] if model else []
    try:
        config = load_config(RolloutConfig, args.config, [*overrides, *args.overrides])
    except InvalidArgument as exc:
        print(f"rollout: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
