"""Sampler snapshots by identity, full ("base") or as a lossless delta from the previous one.

The gateway of an RLOR trainer job writes them (`save_weights_for_sampler` with a name) and service
mode's deployments hot-load them; the store lives in the gateway package because service mode imports
the gateway and never the other way round.

Fireworks' WeightSyncer saves a chain: the first snapshot is `base` (full weights), later ones `delta`.
Anvil's delta format (`anvil-xor-zstd-v1`), one directory per snapshot:

    snapshot.json   {"format", "identity", "kind": "base"|"delta", "previous", "digest", "files"}
    delta.bin.zst   zstd( concat over tensors sorted by name of  new_bytes XOR previous_bytes )
                    (protos/weights_delta.py: the stream transport's delta chunks use the same codec)
    (base only)     the Hugging Face files the learner wrote (config, tokenizer, model.safetensors)

XOR of two float tensors is zero wherever a value did not change, so a delta of a small update
compresses to a fraction of the full weights; it is exact (bit for bit), shapes and dtypes must match the
previous snapshot, and `digest` (protos.weights_codec.digest: sha256 over name-sorted tensor bytes) of
the reconstructed weights is checked before anything is served. `materialize` rebuilds a delta's full
Hugging Face directory from its chain (cached), or raises FailedPrecondition on any mismatch.

A snapshot is its tenant's (`owner` in snapshot.json, coordinator.gateway.tenancy): another tenant's
`meta(identity, owner)` is NOT_FOUND, as for one never saved, a delta cannot build on it, and its
identity cannot be saved over (ALREADY_EXISTS: identities stay one namespace per account, like job ids).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from protos.weights_codec import digest
from protos.weights_delta import apply_in_place, xor_zstd_encode

FORMAT = "anvil-xor-zstd-v1"
WEIGHTS = "model.safetensors"
META = "snapshot.json"
DELTA = "delta.bin.zst"


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.contiguous().view(torch.uint8).numpy().tobytes() for name, t in tensors.items()}


def weights_digest(directory: Path) -> str:
    return digest(_tensor_bytes(load_file(directory / WEIGHTS)))


class SnapshotStore:
    """Snapshots under `root/<identity>/`; `root/.materialized/<identity>/` caches rebuilt deltas."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, identity: str) -> Path:
        if not identity or "/" in identity or identity.startswith("."):
            raise InvalidArgument(f"snapshot identity {identity!r} must be a non-empty name without '/'")
        return self.root / identity

    def exists(self, identity: str) -> bool:
        return (self.path(identity) / META).is_file()

    def meta(self, identity: str, owner: str | None = None) -> dict:
        """The snapshot's metadata; with `owner`, NOT_FOUND unless that tenant saved it."""
        file = self.path(identity) / META
        meta = json.loads(file.read_text()) if file.is_file() else None
        if meta is None or (owner is not None and meta.get("owner", "") != owner):
            raise NotFound(f"no sampler snapshot {identity!r}; save it with save_weights_for_sampler first")
        return meta

    def _claim(self, identity: str, owner: str) -> Path:
        """The directory for `identity`, which `owner` may write (new, or already `owner`'s)."""
        target = self.path(identity)
        if self.exists(identity) and json.loads((target / META).read_text()).get("owner", "") != owner:
            raise AlreadyExists(f"snapshot identity {identity!r} is taken in this account; choose another name")
        return target

    def add_base(self, identity: str, weights_dir: Path, owner: str = "") -> dict:
        """Adopt a Hugging Face directory (moved in) as a full snapshot of tenant `owner`."""
        target = self._claim(identity, owner)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(weights_dir), target)
        meta = {"format": FORMAT, "identity": identity, "kind": "base", "previous": None,
                "digest": weights_digest(target), "owner": owner}  # fmt: skip
        (target / META).write_text(json.dumps(meta))
        return meta

    def add_delta(self, identity: str, weights_dir: Path, previous: str, owner: str = "") -> dict:
        """Store `weights_dir` as a delta from `owner`'s snapshot `previous`; the full weights are not kept."""
        self.meta(previous, owner)
        target = self._claim(identity, owner)
        before = load_file(self.materialize(previous) / WEIGHTS)
        after = load_file(weights_dir / WEIGHTS)
        if {n: (t.dtype, t.shape) for n, t in before.items()} != {n: (t.dtype, t.shape) for n, t in after.items()}:
            raise FailedPrecondition(f"snapshot {identity!r} does not have the tensors of {previous!r}; save a base")
        old, new = _tensor_bytes(before), _tensor_bytes(after)
        names = sorted(new)
        delta = xor_zstd_encode(b"".join(new[n] for n in names), b"".join(old[n] for n in names), level=3)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        (target / DELTA).write_bytes(delta)
        meta = {"format": FORMAT, "identity": identity, "kind": "delta", "previous": previous, "digest": digest(new),
                "owner": owner}  # fmt: skip
        (target / META).write_text(json.dumps(meta))
        shutil.rmtree(weights_dir, ignore_errors=True)
        return meta

    def size_bytes(self, identity: str) -> int:
        return sum(p.stat().st_size for p in self.path(identity).rglob("*") if p.is_file())

    def materialize(self, identity: str) -> Path:
        """The full, digest-verified Hugging Face directory of a snapshot."""
        meta = self.meta(identity)
        if meta.get("format") != FORMAT:
            raise FailedPrecondition(f"snapshot {identity!r} has format {meta.get('format')!r}, not {FORMAT}")
        if meta["kind"] == "base":
            directory = self.path(identity)
            self._verify(identity, directory, meta["digest"])
            return directory
        cached = self.root / ".materialized" / identity
        if (cached / META).is_file():
            self._verify(identity, cached, meta["digest"])
            return cached
        previous_dir = self.materialize(meta["previous"])
        before = load_file(previous_dir / WEIGHTS)
        names = sorted(before)
        flat = np.frombuffer(bytearray(b"".join(_tensor_bytes(before)[n] for n in names)), dtype=np.uint8)
        try:
            apply_in_place(flat, (self.path(identity) / DELTA).read_bytes(), flat.size)
        except InvalidArgument as exc:  # corrupt, truncated or longer than the previous snapshot
            raise FailedPrecondition(f"snapshot {identity!r}: the delta does not apply ({exc})") from exc
        rebuilt, offset = {}, 0
        for name in names:
            tensor = before[name]
            size = tensor.numel() * tensor.element_size()
            piece = torch.from_numpy(flat[offset : offset + size])
            rebuilt[name] = piece.view(tensor.dtype).reshape(tensor.shape)
            offset += size
        if digest(_tensor_bytes(rebuilt)) != meta["digest"]:
            raise FailedPrecondition(f"snapshot {identity!r}: rebuilt weights do not match its digest (corrupted)")
        staging = cached.with_name(f".{identity}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(previous_dir, staging, ignore=shutil.ignore_patterns(WEIGHTS, META, DELTA))
        save_file(rebuilt, staging / WEIGHTS, metadata={"format": "pt"})
        (staging / META).write_text(json.dumps(meta))
        shutil.rmtree(cached, ignore_errors=True)
        staging.rename(cached)
        return cached

    @staticmethod
    def _verify(identity: str, directory: Path, expected: str) -> None:
        try:
            actual = weights_digest(directory)
        except Exception as exc:  # unreadable safetensors: corrupted
            raise FailedPrecondition(f"snapshot {identity!r}: its weights cannot be read ({exc})") from exc
        if actual != expected:
            raise FailedPrecondition(f"snapshot {identity!r}: weights do not match its digest (corrupted)")
