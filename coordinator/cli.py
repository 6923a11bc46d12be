"""The `anvil` command line. Parsing comes first and imports nothing heavy, so `anvil --help` is instant;
each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from coordinator.fleet.cli import add_replicas_command
from coordinator.tokenizer_cache import add_tokenizer_command
from servicekit.config import add_config_arguments, add_override_argument


def _cmd_models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from coordinator.models import BUILTIN_MODELS, anvil_home

    table = Table(title=f"Built-in models (cache: {anvil_home() / 'models'})")
    for column in ("name", "architecture", "layers", "hidden", "heads (q/kv)", "head_dim", "context", "cached"):
        table.add_column(column, no_wrap=column in ("name", "architecture"))
    for spec in BUILTIN_MODELS.values():
        cached = any((anvil_home() / "models").glob(f"{spec.name}-{spec.fingerprint()}/config.json"))
        experts = f" {spec.num_experts}x top-{spec.num_experts_per_tok}" if spec.num_experts else ""
        table.add_row(
            spec.name,
            spec.architecture + experts,
            str(spec.num_hidden_layers),
            str(spec.hidden_size),
            f"{spec.num_attention_heads}/{spec.num_key_value_heads}",
            str(spec.head_dim),
            str(spec.max_position_embeddings),
            "yes" if cached else "no",
        )
    Console().print(table)
    return 0


def _cmd_models_build(args: argparse.Namespace) -> int:
    from coordinator.models import resolve_model

    print(resolve_model(args.name))
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    import asyncio

    from coordinator.smoke import run_smoke

    return asyncio.run(run_smoke(args.model, steps=args.steps))


def _cmd_learner(args: argparse.Namespace) -> int:
    from coordinator.models import resolve_model
    from learner.__main__ import run

    return run(args, models={name: str(resolve_model(name)) for name in args.models})


def _cmd_rollout(args: argparse.Namespace) -> int:
    from coordinator.models import resolve_model
    from rollout.__main__ import run

    return run(args, model=(args.model, str(resolve_model(args.model))))


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import datetime
    import json
    import sys
    from pathlib import Path

    from coordinator.config import RunConfig
    from coordinator.failures import report_failure
    from coordinator.run import CONFIG_FILE, run
    from servicekit.config import load_config

    run_dir: Path | None = None
    try:
        if args.resume is not None:
            run_dir = args.resume
            saved = json.loads((run_dir / CONFIG_FILE).read_text())
            config = load_config(RunConfig, None, args.overrides, base=saved)
        else:
            if args.config is None:
                print("anvil run: give a config file (e.g. configs/tiny.toml) or --resume RUN_DIR", file=sys.stderr)
                return 2
            config = load_config(RunConfig, args.config, args.overrides)
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = args.run_dir or Path("runs") / f"{stamp}-{args.config.stem}"
        asyncio.run(run(config, run_dir, resume=args.resume is not None))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("anvil run: stopped; the services it started were stopped too", file=sys.stderr)
        return 130
    except Exception as exc:  # one line naming the failed service (exit 2), or a bug's traceback file (1)
        return report_failure(exc, run_dir)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from coordinator.gateway.config import GatewayConfig
    from coordinator.serve import serve
    from servicekit.config import serve_from_arguments

    return serve_from_arguments("anvil serve", GatewayConfig, args, [], serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anvil",
        description="Anvil: full-parameter RL post-training behind a Tinker-compatible API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list or build the built-in models")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_commands.add_parser("list", help="list built-in models and whether they are cached").set_defaults(
        handler=_cmd_models_list
    )
    build = models_commands.add_parser("build", help="build (or find) a model directory and print its path")
    build.add_argument("name", help="a built-in name (anvil-tiny, anvil-small) or a Hugging Face directory")
    build.set_defaults(handler=_cmd_models_build)

    run = commands.add_parser("run", help="run an RL job: rollout -> rewards -> learner -> weights, continuously")
    run.add_argument("config", nargs="?", type=Path, help="TOML run config, e.g. configs/tiny.toml")
    run.add_argument(
        "--run-dir", type=Path, help="where metrics, checkpoints and plots go (default: runs/<time>-<name>)"
    )
    run.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    add_override_argument(run)
    run.set_defaults(handler=_cmd_run)

    serve = commands.add_parser(
        "serve",
        help="serve the Tinker REST API and Fireworks-style service mode (trainer jobs, deployments, hot-load)",
    )
    add_config_arguments(serve)
    serve.set_defaults(handler=_cmd_serve)

    add_replicas_command(commands)
    add_tokenizer_command(commands)

    learner = commands.add_parser("learner", help="serve anvil.v1.LearnerService (full-parameter training)")
    add_config_arguments(learner)
    learner.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME",
        help="built-in model to register by name (repeatable; default: anvil-tiny)",
    )
    learner.set_defaults(handler=_cmd_learner)

    rollout = commands.add_parser("rollout", help="serve anvil.v1.RolloutService (sampling, weight updates)")
    add_config_arguments(rollout)
    rollout.add_argument(
        "--model", default="anvil-tiny", help="model name or Hugging Face directory to serve (default: anvil-tiny)"
    )
    rollout.set_defaults(handler=_cmd_rollout)

    smoke = commands.add_parser(
        "smoke", help="fine-tune the built-in model over a real learner on loopback and check it learned"
    )
    smoke.add_argument("--model", default="anvil-tiny", help="model name or directory (default: anvil-tiny)")
    smoke.add_argument("--steps", type=int, default=80, help="optimizer steps (default: 80)")
    smoke.set_defaults(handler=_cmd_smoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "models", "") is None:
        args.models = ["anvil-tiny"]
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
