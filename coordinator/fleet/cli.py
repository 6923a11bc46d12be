"""`anvil replicas list|add|remove`: the fleet's REST API (coordinator/fleet/routes.py) from a shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.table import Table

from coordinator.fleet.config import REPLICAS_PATH as PREFIX


def add_replicas_command(commands: argparse._SubParsersAction) -> None:
    replicas = commands.add_parser("replicas", help="list, add or remove the rollout replicas of a running anvil serve")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server",
        default=os.environ.get("ANVIL_SERVER", "http://127.0.0.1:8000"),
        help="anvil serve's URL (default: $ANVIL_SERVER or http://127.0.0.1:8000)",
    )
    server.add_argument("--api-key", default=os.environ.get("ANVIL_API_KEY"), help="default: $ANVIL_API_KEY")
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
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(args.server.rstrip("/") + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if args.api_key:
        request.add_header("X-API-Key", args.api_key)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SystemExit(f"anvil replicas: {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(
            f"anvil replicas: cannot reach {args.server} ({exc.reason}); is anvil serve running?"
        ) from None


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
