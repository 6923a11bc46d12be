"""`python -m learner --config FILE [--set key=value ...]`: serve anvil.v1.LearnerService."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from servicekit.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="learner", description="Serve anvil.v1.LearnerService.")
    add_config_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace, models: dict[str, str] | None = None) -> int:
    """Serve; `models` (name -> directory) is filled in by `anvil learner --model NAME`."""
    from learner.config import LearnerConfig
    from learner.server import serve
    from servicekit.config import serve_from_arguments

    overrides = [f'models.{name}="{path}"' for name, path in (models or {}).items()]
    return serve_from_arguments("learner", LearnerConfig, args, overrides, serve)


if __name__ == "__main__":
    sys.exit(main())
