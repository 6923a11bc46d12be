"""Typed service configs from TOML with dotted CLI overrides, shared by every entry point.

Precedence: model defaults < the TOML file < `--set section.key=value` overrides. Values of overrides
are parsed as TOML (`--set server.port=50051`, `--set backend.device="cpu"`), falling back to a plain
string, so types match the file format. Validation is pydantic's: an unknown key or a bad value fails
with the field named.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from protos.errors import InvalidArgument
from servicekit.cpus import apply_cpus_from_env
from servicekit.process import die_with_parent

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The two options every service entry point takes."""
    parser.add_argument("--config", type=Path, help="TOML config file (defaults apply when omitted)")
    add_override_argument(parser)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """`--set KEY=VALUE` (repeatable), collected in `args.overrides`."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set server.port=50051 (repeatable)",
    )


def load_config(
    model: type[ConfigT], path: Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None
) -> ConfigT:
    """Build `model` from `base` (e.g. a saved config), else an optional TOML file, then dotted overrides;
    raise InvalidArgument on bad input."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise InvalidArgument(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from exc
    for override in overrides:
        _apply_override(data, override)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidArgument(f"invalid {model.__name__}: {exc}") from exc


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise InvalidArgument(f"override {override!r} must look like section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InvalidArgument(f"override {override!r}: {part!r} is not a section")
    node[leaf] = value


def serve_from_arguments(
    name: str,
    model: type[ConfigT],
    args: argparse.Namespace,
    extra_overrides: Sequence[str],
    serve: Callable[[ConfigT], Awaitable[None]],
) -> int:
    """The body of every service entry point: log setup, config (exit 2 naming the bad field), serve."""
    import asyncio
    import logging
    import sys

    die_with_parent()
    apply_cpus_from_env()  # the cores `anvil run` gave this service, if it gave any
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(model, args.config, [*extra_overrides, *args.overrides])
    except InvalidArgument as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(config))
    return 0
