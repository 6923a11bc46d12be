"""Deployments and trainer jobs, persisted in SQLite so they survive a restart of `anvil serve`.

A row holds the resource's id, its state, and its JSON document (the create body plus what Anvil adds:
status message, current snapshot identity, ...). Processes are not persisted: on start, `anvil serve`
brings every live resource back up from its row. Each document names the tenant that created it
(`anvilTenant`, coordinator.gateway.tenancy): `get_own` is what a caller may see; ids stay global, like
Fireworks' resource names in one account.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from coordinator.gateway import tenancy

TABLES = ("deployments", "trainer_jobs")
OWNER = "anvilTenant"


class ResourceStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        for table in TABLES:
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, doc TEXT NOT NULL)")

    def put(self, table: str, resource_id: str, doc: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO {table} (id, doc) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET doc = excluded.doc",
                (resource_id, json.dumps(doc)),
            )

    def get(self, table: str, resource_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT doc FROM {table} WHERE id = ?", (resource_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def get_own(self, table: str, resource_id: str) -> dict[str, Any] | None:
        """The document if the calling tenant created it; None for another tenant's, as for none."""
        doc = self.get(table, resource_id)
        return doc if doc is not None and tenancy.owns(doc.get(OWNER, "")) else None

    def all(self, table: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(f"SELECT doc FROM {table} ORDER BY rowid").fetchall()
        return [json.loads(row[0]) for row in rows]

    def delete(self, table: str, resource_id: str) -> None:
        with self._lock:
            self._db.execute(f"DELETE FROM {table} WHERE id = ?", (resource_id,))

    def close(self) -> None:
        self._db.close()
