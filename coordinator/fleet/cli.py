"""`anvil replicas list|add|remove`: the fleet's REST API (coordinator/fleet/routes.py) from a shell."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.fleet.config import REPLICAS_PATH as PREFIX
from coordinator.server_cli import request, server_arguments


def add_replicas_command(commands: argparse._SubParsersAction) -> None:
    replicas = commands.add_parser("replicas", help="list, add or remove the rollout replicas of a running anvil serve")
    server = server_arguments()
    actions = replicas.add_subparsers(dest="replicas_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[server], help="every replica: state, address, version, load")
    listing.set_defaults(handler=_list)
    add = actions.add_parser("add", parents=[server], help="add a running rollout service (serves once resynced)")
    add.add_argument("address", help="host:port of the rollout service")
    add.add_argument("--name", help="its name in the fleet (default: replica-<n>)")
    add.set_defaults(handler=_add)
    remove = actions.add_parser("remove", parents=[server], help="take a replica out (one started here is stopped)")
    remove.add_argument("name")
    remove.set_defaults(handler=_remove)


def _request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    return request(args, "anvil replicas", method, path, body)


def _print(replicas: list[dict[str, Any]]) -> None:
    table = Table()
    for column in ("name", "state", "address", "version", "in flight", "tokens/s", "restarts"):
        table.add_column(column)
    for r in replicas:
        table.add_row(r["name"], r["state"], r["address"], str(r["version"]), str(r["in_flight"]),
                      f"{r['tokens_per_s']:.0f}", str(r["restarts"]))  # fmt: skip
    Console(file=sys.stdout).print(table)


def _list(args: argparse.Namespace) -> int:
    _print(_request(args, "GET", PREFIX)["replicas"])
    return 0


def _add(args: argparse.Namespace) -> int:
    _print([_request(args, "POST", PREFIX, {"address": args.address, "name": args.name})])
    return 0


def _remove(args: argparse.Namespace) -> int:
    _print([_request(args, "DELETE", f"{PREFIX}/{args.name}")])
    return 0
