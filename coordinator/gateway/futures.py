"""Tinker's futures: every long operation answers with a request id and its result is fetched by
`retrieve_future`, which the gateway long-polls (holds until done or `long_poll_s`, then `try_again`).

A result is an `Outcome`: a value (encoded by the route that polls it) or a categorised error, which
Tinker's SDK raises as `RequestFailedError`. Every error passes `resolve`, which takes server filesystem
paths out of its message (a learner or rollout error names its directories; a remote client must not
see them, and cannot use them). Finished futures are kept `ttl_s` after completion so a
poll that was lost in transit can be repeated, then dropped. A future is the tenant's that made the
request: request ids are sequential, so another tenant's poll is NOT_FOUND, like an unknown id.

With a journal (coordinator.gateway.journal), every future and each finished outcome is also written
there, and `restore` brings them back after a restart: a poll of a request finished before it gets the
same answer; a request unfinished at the crash is pending again until the restore runs it anew.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from coordinator.gateway import tenancy
from coordinator.gateway.journal import GatewayJournal
from coordinator.gateway.results import decode_value, encode_value
from protos.errors import (
    AlreadyExists,
    AnvilError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)

USER_ERRORS = (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unauthenticated, ResourceExhausted)
"""Errors the caller can fix; everything else is the server's fault (category "server")."""


SERVER_PATH = "<server path>"
_PATH_CHARS = r"[^\s'\"(),;<>]"
_ABSOLUTE = re.compile(rf"(?<![\w:/.~<>-])/(?!api/|training/|anvil/){_PATH_CHARS}+(?:/{_PATH_CHARS}*)+")
"""An absolute path of two or more segments; the gateway's own URL paths (/api/v1/...) stay."""


def without_paths(message: str, roots: Iterable[Path] = ()) -> str:
    """`message` with each server filesystem path replaced by `<server path>`: any under `roots` (relative
    ones too, e.g. `runs/serve/learner/...`), and any absolute path."""

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        return SERVER_PATH + text[len(text.rstrip(".:")) :]

    for root in roots:
        for form in {str(root), str(root.resolve())} - {".", "/"}:
            message = re.sub(rf"(?<![\w/.<>-]){re.escape(form)}(?:/{_PATH_CHARS}*)?", replace, message)
    return _ABSOLUTE.sub(replace, message)


@dataclass(frozen=True)
class Outcome:
    value: Any = None
    error: str | None = None
    category: Literal["user", "server"] = "server"


def outcome_to_json(outcome: Outcome) -> str:
    if outcome.error is not None:
        return json.dumps({"error": outcome.error, "category": outcome.category})
    return json.dumps({"value": encode_value(outcome.value)})


def outcome_from_json(text: str) -> Outcome:
    doc = json.loads(text)
    if "error" in doc:
        return Outcome(error=doc["error"], category=doc["category"])
    return Outcome(value=decode_value(doc["value"]))


def outcome_of_error(exc: BaseException) -> Outcome:
    if isinstance(exc, USER_ERRORS):
        return Outcome(error=str(exc), category="user")
    if isinstance(exc, AnvilError):
        return Outcome(error=str(exc), category="server")
    return Outcome(error=f"internal error: {type(exc).__name__}: {exc}", category="server")


@dataclass
class _Entry:
    kind: str
    owner: str = field(default_factory=tenancy.current)
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    finished_at: float | None = None


class FutureStore:
    """request id -> pending or finished Outcome; ids are `req-<n>`, unique for the gateway's lifetime."""

    def __init__(
        self, ttl_s: float = 900.0, private_roots: Iterable[Path] = (), journal: GatewayJournal | None = None
    ) -> None:
        self.private_roots = tuple(private_roots)
        """Server directories (state, model) whose paths no error message may show."""
        self._entries: dict[str, _Entry] = {}
        self._ids = itertools.count(1)
        self._prefix = f"req-{time.time_ns():x}-"
        self.ttl_s = ttl_s
        self.journal = journal

    def create(self, kind: str) -> str:
        self._expire()
        request_id = f"{self._prefix}{next(self._ids)}"
        entry = self._entries[request_id] = _Entry(kind)
        if self.journal is not None:
            self.journal.future_created(request_id, entry.owner, kind)
        return request_id

    def restore(self) -> list[str]:
        """Bring back the journal's futures; return the ids of those unfinished at the crash (pending now)."""
        if self.journal is None:
            return []
        pending = []
        for request_id, owner, kind, outcome, age_s in self.journal.futures(self.ttl_s):
            entry = self._entries[request_id] = _Entry(kind, owner)
            if outcome is None:
                pending.append(request_id)
            else:
                entry.done.set_result(outcome_from_json(outcome))
                entry.finished_at = time.monotonic() - (age_s or 0.0)
        return pending

    def resolve(self, request_id: str, outcome: Outcome) -> None:
        entry = self._entries.get(request_id)
        if outcome.error is not None:
            outcome = dataclasses.replace(outcome, error=without_paths(outcome.error, self.private_roots))
        if entry is not None and not entry.done.done():
            entry.done.set_result(outcome)
            entry.finished_at = time.monotonic()
            if self.journal is not None:
                self.journal.future_finished(request_id, outcome_to_json(outcome))

    def run(self, kind: str, work: Callable[[], Awaitable[Any]], request_id: str | None = None) -> str:
        """Start `work` now in its own task; its value or error resolves a new future (or `request_id`, a
        restored pending one)."""
        request_id = request_id or self.create(kind)

        async def execute() -> None:
            try:
                self.resolve(request_id, Outcome(value=await work()))
            except Exception as exc:  # every failure becomes the future's error, never a lost request
                self.resolve(request_id, outcome_of_error(exc))

        asyncio.get_running_loop().create_task(execute())
        return request_id

    def finished(self, request_id: str) -> Outcome | None:
        """The outcome of `request_id` if it is known and finished (any tenant's: for the restore)."""
        entry = self._entries.get(request_id)
        return entry.done.result() if entry is not None and entry.done.done() else None

    def kind(self, request_id: str) -> str:
        return self._entry(request_id).kind

    async def wait(self, request_id: str, timeout_s: float) -> Outcome | None:
        """The outcome, or None when still running after `timeout_s` (the caller answers try_again)."""
        entry = self._entry(request_id)
        try:
            return await asyncio.wait_for(asyncio.shield(entry.done), timeout_s)
        except TimeoutError:
            return None

    def _entry(self, request_id: str) -> _Entry:
        entry = self._entries.get(request_id)
        if entry is None or not tenancy.owns(entry.owner):
            raise NotFound(f"no request {request_id!r}; it never existed or its result expired")
        return entry

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        stale = [rid for rid, e in self._entries.items() if e.finished_at is not None and e.finished_at < cutoff]
        for request_id in stale:
            del self._entries[request_id]
