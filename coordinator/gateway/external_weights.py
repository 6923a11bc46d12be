"""Signed download URLs for external weights, served by the gateway itself.

Tinker's `get_external_weights_urls` answers one URL per file of an external weights checkpoint, and its
clients (`tinker checkpoint download`, the cookbook) fetch them with plain unauthenticated GETs. So each
URL carries its own proof: an HMAC-SHA256, under a key only this gateway holds, of the checkpoint path,
the file and an expiry time. The key lives in `<state_dir>/url_signing.key` (0600), so links survive a
gateway restart; deleting the file revokes every link at the next start.

The files are the checkpoint's own (no copy is made), so the gateway must see the directory the learner
wrote: the same host, or a shared filesystem, as for the sizes it already reports.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from coordinator.gateway.checkpoints import CheckpointRecord, CheckpointStore, iso_time, tinker_path
from protos.errors import FailedPrecondition

FILES_ROUTE = "/api/v1/anvil/external_weights_files"
"""Where the signed URLs point: `<FILES_ROUTE>/<run_id>/<name>/<file>?expires=<unix>&signature=<hex>`."""
URL_LIFETIME_S = 3600


class LinkRefused(Exception):
    """A download URL that is not (or no longer) good: forged, expired, or its checkpoint gone."""


class ExternalWeightLinks:
    def __init__(self, state_dir: Path, checkpoints: CheckpointStore, clock: Callable[[], float] = time.time) -> None:
        self.checkpoints = checkpoints
        self.clock = clock
        self._key = _signing_key(state_dir / "url_signing.key")

    def urls(self, record: CheckpointRecord, base_url: str) -> dict:
        """Tinker's ExternalWeightsUrlsResponse for `record` (an external weights checkpoint the caller may
        read): a URL per file, relative path → URL, all expiring together."""
        if record.kind != "external_weights":
            raise FailedPrecondition(
                f"{record.path} is not external weights; export them with save_weights_external, or download a "
                "training state with `tinker checkpoint download`"
            )
        root = Path(record.local_path)
        expires = int(self.clock()) + URL_LIFETIME_S
        urls = {}
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root).as_posix()
            signature = self._sign(record.path, relative, expires)
            route = f"{FILES_ROUTE}/{quote(record.run_id, safe='')}/{quote(record.name, safe='')}/{quote(relative)}"
            urls[relative] = f"{base_url.rstrip('/')}{route}?expires={expires}&signature={signature}"
        return {"urls": urls, "expires": iso_time(expires)}

    def file(self, run_id: str, name: str, relative: str, expires: int, signature: str) -> Path:
        """The file a download URL names, once its signature and expiry check; LinkRefused otherwise."""
        path = tinker_path(run_id, "external_weights", name)
        if not hmac.compare_digest(self._sign(path, relative, expires).encode(), signature.encode()):
            raise LinkRefused("this download link is not valid; ask for new ones with get_external_weights_urls")
        if expires <= self.clock():
            raise LinkRefused(
                f"this download link expired at {iso_time(expires)}; ask for new ones with get_external_weights_urls"
            )
        record = self.checkpoints.unscoped(path)
        if record is None:
            raise LinkRefused(f"{path} was deleted or has expired")
        root = Path(record.local_path).resolve()
        file = (root / relative).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            raise LinkRefused(f"{path} has no file {relative!r}")
        return file

    def _sign(self, path: str, relative: str, expires: int) -> str:
        message = f"{path}\n{relative}\n{expires}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def _signing_key(key_file: Path) -> bytes:
    """This gateway's URL-signing key, made on first use (readable by its owner only)."""
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another gateway on this state_dir made it first
            pass
        else:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(secrets.token_bytes(32))
    return key_file.read_bytes()
