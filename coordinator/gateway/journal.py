"""The gateway's journal: what a restart of `anvil serve` must find again, in `<state_dir>/gateway.sqlite`.

A Tinker client survives a restart of the server only if the server remembers what the client relies on:
its session and training/sampling clients (their ids), every request id it was given and the outcome of
each finished one (a poll after the restart gets the same answer), the seq_ids a training client used
(a retry of one gets the first request's id, never a second run), and each training model's state as of
its last finished request. The model's weights and AdamW moments live in the learner, which restarts with
the gateway, so the journal keeps instead a *durable state* (a learner checkpoint taken in the background
after optimizer steps) and the bodies of the requests that changed the model since: replaying those on
the loaded state rebuilds it exactly (coordinator.gateway.restore). Requests accepted but unfinished at
the crash are run after the restart under their original request ids.

SQLite (WAL, one connection, the event loop's thread): every write is one small transaction, so a kill
at any point leaves the journal as it was before or after it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, finished INTEGER NOT NULL DEFAULT 0, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (id TEXT PRIMARY KEY, session_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samplers (id TEXT PRIMARY KEY, session_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS futures (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, kind TEXT NOT NULL, outcome TEXT, finished_at REAL
);
CREATE TABLE IF NOT EXISTS ops (
    request_id TEXT PRIMARY KEY, target TEXT NOT NULL, seq_id INTEGER NOT NULL, kind TEXT NOT NULL,
    fingerprint BLOB, codec TEXT NOT NULL, body BLOB
);
CREATE INDEX IF NOT EXISTS ops_by_target ON ops (target, seq_id);
"""


@dataclass(frozen=True)
class OpRecord:
    """One accepted request that a restart may have to replay or run: a training client's sequenced
    operation (target = model id), a sample (target = sampling client id) or a model creation
    (target = session id)."""

    request_id: str
    target: str
    seq_id: int
    kind: str
    fingerprint: bytes | None
    codec: str
    """How `body` is encoded: "json", or "proto" (a forward_backward in Tinker's protobuf)."""
    body: bytes | None
    """None once a durable state covers it (its result is still kept in `futures`)."""


class GatewayJournal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- documents: sessions, models, samplers ------------------------------------------------------

    def put(self, table: str, key: str, doc: dict[str, Any], session_id: str | None = None) -> None:
        if table == "sessions":
            self._db.execute(
                "INSERT INTO sessions (id, doc) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                (key, json.dumps(doc)),
            )
        else:
            self._db.execute(
                f"INSERT INTO {table} (id, session_id, doc) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                (key, session_id, json.dumps(doc)),
            )

    def finish_session(self, session_id: str) -> None:
        """The session ended for good: it and its clients are not restored, their replay bodies go."""
        with self._db:
            self._db.execute("UPDATE sessions SET finished = 1 WHERE id = ?", (session_id,))
            for table in ("models", "samplers"):
                for (key,) in self._db.execute(f"SELECT id FROM {table} WHERE session_id = ?", (session_id,)):
                    self._db.execute("DELETE FROM ops WHERE target = ?", (key,))
                self._db.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            self._db.execute("DELETE FROM ops WHERE target = ?", (session_id,))

    def open_sessions(self) -> list[tuple[str, dict[str, Any]]]:
        rows = self._db.execute("SELECT id, doc FROM sessions WHERE finished = 0 ORDER BY rowid")
        return [(key, json.loads(doc)) for key, doc in rows]

    def docs(self, table: str, session_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(f"SELECT doc FROM {table} WHERE session_id = ? ORDER BY rowid", (session_id,))
        return [json.loads(doc) for (doc,) in rows]

    # --- futures ------------------------------------------------------------------------------------

    def future_created(self, request_id: str, owner: str, kind: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO futures (id, owner, kind) VALUES (?, ?, ?)", (request_id, owner, kind))

    def future_finished(self, request_id: str, outcome: str) -> None:
        self._db.execute(
            "UPDATE futures SET outcome = ?, finished_at = ? WHERE id = ?", (outcome, time.time(), request_id)
        )

    def futures(self, ttl_s: float) -> list[tuple[str, str, str, str | None, float | None]]:
        """(id, owner, kind, outcome or None while pending, age in seconds) of every future still kept;
        finished ones older than `ttl_s` are dropped first."""
        now = time.time()
        self._db.execute("DELETE FROM futures WHERE finished_at IS NOT NULL AND finished_at < ?", (now - ttl_s,))
        rows = self._db.execute("SELECT id, owner, kind, outcome, finished_at FROM futures ORDER BY rowid")
        return [(key, owner, kind, outcome, None if at is None else now - at) for key, owner, kind, outcome, at in rows]

    # --- operations ---------------------------------------------------------------------------------

    def op_accepted(self, op: OpRecord) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO ops (request_id, target, seq_id, kind, fingerprint, codec, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (op.request_id, op.target, op.seq_id, op.kind, op.fingerprint, op.codec, op.body),
        )

    def ops(self, target: str) -> list[OpRecord]:
        rows = self._db.execute(
            "SELECT request_id, target, seq_id, kind, fingerprint, codec, body FROM ops WHERE target = ? "
            "ORDER BY seq_id, rowid",
            (target,),
        )
        return [OpRecord(*row) for row in rows]

    def forget_bodies(self, target: str, through_seq_id: int) -> None:
        """A durable state covers `target`'s requests up to `through_seq_id`: their bodies are not needed."""
        self._db.execute(
            "UPDATE ops SET body = NULL WHERE target = ? AND seq_id <= ? AND body IS NOT NULL", (target, through_seq_id)
        )

    def forget_model(self, model_id: str) -> None:
        """The training client was unloaded: nothing of it is restored."""
        with self._db:
            self._db.execute("DELETE FROM models WHERE id = ?", (model_id,))
            self._db.execute("DELETE FROM ops WHERE target = ?", (model_id,))
