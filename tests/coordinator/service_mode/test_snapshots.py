"""The snapshot store on its own: deltas are lossless and small when little changed; corruption of a
base or a delta, or a chain that does not fit, is refused before anything would be served."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from coordinator.gateway.snapshot_store import WEIGHTS, SnapshotStore
from protos.errors import AlreadyExists, FailedPrecondition, NotFound


def copy_with(src: Path, dst: Path, change=None) -> Path:
    shutil.copytree(src, dst)
    if change is not None:
        tensors = load_file(dst / WEIGHTS)
        change(tensors)
        save_file(tensors, dst / WEIGHTS, metadata={"format": "pt"})
    return dst


def test_a_delta_chain_rebuilds_bit_for_bit_and_is_small(tiny_model_dir, tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    store.add_base("a", copy_with(tiny_model_dir, tmp_path / "a"))
    name = sorted(load_file(tiny_model_dir / WEIGHTS))[0]

    def nudge(tensors):
        tensors[name] = tensors[name] + 1e-3

    expected = copy_with(tiny_model_dir, tmp_path / "expected", nudge)
    store.add_delta("b", copy_with(tiny_model_dir, tmp_path / "b", nudge), "a")
    store.add_delta("c", copy_with(tiny_model_dir, tmp_path / "c", nudge), "b")  # no change from b
    for identity in ("b", "c"):
        rebuilt = load_file(store.materialize(identity) / WEIGHTS)
        for key, tensor in load_file(expected / WEIGHTS).items():
            assert torch.equal(rebuilt[key], tensor), key
    assert store.size_bytes("b") < store.size_bytes("a") / 4  # one tensor of many changed
    assert store.size_bytes("c") < 1000  # nothing changed


def test_corruption_and_bad_chains_are_refused(tiny_model_dir, tmp_path):
    store = SnapshotStore(tmp_path / "snapshots")
    store.add_base("a", copy_with(tiny_model_dir, tmp_path / "a"))
    store.add_delta(
        "b", copy_with(tiny_model_dir, tmp_path / "b", lambda t: t.update({k: v * 2 for k, v in t.items()})), "a"
    )
    other = copy_with(tiny_model_dir, tmp_path / "other", lambda t: t.pop(sorted(t)[0]))
    with pytest.raises(FailedPrecondition, match="save a base"):  # a delta needs the same tensors
        store.add_delta("d", other, "a")
    delta = store.path("b") / "delta.bin.zst"
    raw = bytearray(delta.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    delta.write_bytes(bytes(raw))
    with pytest.raises(FailedPrecondition, match=r"corrupted|truncated|longer"):
        store.materialize("b")
    weights = store.path("a") / WEIGHTS
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(FailedPrecondition, match="digest"):
        store.materialize("a")
    with pytest.raises(NotFound):
        store.materialize("missing")


def test_a_snapshot_is_its_tenants(tiny_model_dir, tmp_path):
    """Another tenant neither finds alice's snapshot, nor builds a delta on it, nor saves over its identity."""
    store = SnapshotStore(tmp_path / "snapshots")
    store.add_base("a", copy_with(tiny_model_dir, tmp_path / "a"), owner="tenant-alice")
    assert store.meta("a", "tenant-alice")["owner"] == "tenant-alice"
    with pytest.raises(NotFound, match="no sampler snapshot 'a'"):
        store.meta("a", "tenant-bob")
    with pytest.raises(NotFound):
        store.add_delta("b", copy_with(tiny_model_dir, tmp_path / "b"), "a", owner="tenant-bob")
    with pytest.raises(AlreadyExists, match="taken"):
        store.add_base("a", copy_with(tiny_model_dir, tmp_path / "a2"), owner="tenant-bob")
    assert store.meta("a", "tenant-alice")["owner"] == "tenant-alice"  # untouched
    store.add_delta("b", copy_with(tiny_model_dir, tmp_path / "b2"), "a", owner="tenant-alice")
    assert store.meta("b", "tenant-alice")["previous"] == "a"
