"""What the CLI commands that talk to a running `anvil serve` share: its URL and key, and one JSON request."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import Any


def server_arguments() -> argparse.ArgumentParser:
    """A parent parser with --server (default $ANVIL_SERVER) and --api-key ($ANVIL_API_KEY, $TINKER_API_KEY)."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server",
        default=os.environ.get("ANVIL_SERVER", "http://127.0.0.1:8000"),
        help="anvil serve's URL (default: $ANVIL_SERVER or http://127.0.0.1:8000)",
    )
    server.add_argument(
        "--api-key",
        default=os.environ.get("ANVIL_API_KEY") or os.environ.get("TINKER_API_KEY"),
        help="default: $ANVIL_API_KEY, else $TINKER_API_KEY",
    )
    return server


def request(args: argparse.Namespace, command: str, method: str, path: str, body: dict | None = None) -> Any:
    """The JSON answer of `method path` on args.server; SystemExit naming `command` and the server's reason."""
    data = json.dumps(body).encode() if body is not None else None
    message = urllib.request.Request(args.server.rstrip("/") + path, data=data, method=method)
    message.add_header("Content-Type", "application/json")
    if args.api_key:
        message.add_header("X-API-Key", args.api_key)
    try:
        with urllib.request.urlopen(message, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise SystemExit(f"{command}: {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(f"{command}: cannot reach {args.server} ({exc.reason}); is anvil serve running?") from None
