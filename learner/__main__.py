"""`python -m learner --config FILE [--set key=value ...]`: serve anvil.v1.LearnerService."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from protos.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="learner", description="Serve anvil.v1.LearnerService.")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace, models: dict[str, str] | None = None) -> int:
    from learner.config import LearnerConfig
    from learner.server import serve
    from protos.config import load_config
    from protos.errors import InvalidArgument

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = [*(f'models.{name}="{path}"' for name, path in (models or {}).items()), *args.overrides]
    try:
        config = load_config(LearnerConfig, args.config, overrides)
    except InvalidArgument as exc:
        print(f"learner: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
