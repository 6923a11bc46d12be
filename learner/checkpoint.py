"""Checkpoint directories that are either complete and verified, or absent.

`write_checkpoint` fills a temp directory next to the target (a backend writes its files into it),
adds `manifest.json` (sha256 and size of every file) and the `COMPLETE` marker, then renames it into
place - the rename is the commit. `verify_checkpoint` is the gate before any load: a missing directory
is NOT_FOUND; a missing marker or a file that fails the manifest is FAILED_PRECONDITION. A disk that
fills up during a write is RESOURCE_EXHAUSTED naming the checkpoint; the partial directory is removed
and earlier checkpoints are untouched (tests/faults/test_full_disk.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from servicekit.failpoints import failpoint

MANIFEST = "manifest.json"
COMPLETE_MARKER = "COMPLETE"


def check_name(name: str) -> str:
    """Checkpoint names are single path segments (Tinker paths split on '/')."""
    if not name or "/" in name or "\\" in name or name in {".", ".."} or name.startswith("."):
        raise InvalidArgument(f"checkpoint name {name!r} must be a non-empty path segment without '/' or a leading '.'")
    return name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(target: Path, fill: Callable[[Path], None], overwrite: bool, metadata: dict) -> Path:
    """Create `target` atomically from what `fill(tmp_dir)` writes; ALREADY_EXISTS unless overwrite."""
    if target.exists() and not overwrite:
        raise AlreadyExists(f"checkpoint {target} already exists; choose another name or pass overwrite=true")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            fill(staging)
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            manifest = {
                "metadata": metadata,
                "files": {str(p.relative_to(staging)): _file_entry(p) for p in files},
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            (staging / COMPLETE_MARKER).write_text("")
            _fsync_dir(staging)
            failpoint("learner.checkpoint_write")
        except Exception as exc:
            if _out_of_space(exc, staging):
                raise ResourceExhausted(
                    f"no space left on the learner's disk while writing checkpoint {target.name!r} ({exc}); "
                    "free space or move checkpoint_dir - earlier checkpoints are intact"
                ) from None
            raise
        if target.exists():
            retired = target.with_name(f".{target.name}.retired")
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _file_entry(path: Path) -> dict:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _out_of_space(exc: BaseException, directory: Path) -> bool:
    """ENOSPC / EDQUOT, also when a library reports it as its own error (safetensors: "os error 28") or
    only as its symptom (torch.save: "unexpected pos" after a short write) on a disk with no room left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "Disk quota exceeded" in text:
        return True
    return shutil.disk_usage(directory).free < 1024 * 1024


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest metadata of a complete, intact checkpoint; raise otherwise (never mutates)."""
    if not path.is_dir():
        raise NotFound(f"no checkpoint at {path}")
    if not (path / COMPLETE_MARKER).is_file() or not (path / MANIFEST).is_file():
        raise FailedPrecondition(
            f"checkpoint {path} is incomplete (no {COMPLETE_MARKER} marker); it was never finished"
        )
    manifest = json.loads((path / MANIFEST).read_text())
    for relative, expected in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            raise FailedPrecondition(f"checkpoint {path} is missing {relative}")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise FailedPrecondition(f"checkpoint {path}: {relative} does not match its manifest (corrupted)")
    return manifest["metadata"]
