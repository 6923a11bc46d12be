"""Weight transports behind one interface (`base.WeightTransport`), picked by name by one factory."""

from __future__ import annotations

from learner.transports.base import (
    PublishContext,
    ReplicaResult,
    WeightSource,
    WeightTransport,
    raise_first_failure,
)
from learner.transports.checkpoint import CheckpointTransport
from learner.transports.relay import RelayTransport
from learner.transports.shm import AutoTransport, ShmTransport
from learner.transports.stream import DirectTransport
from protos.errors import InvalidArgument

TRANSPORTS: dict[str, type[WeightTransport]] = {
    t.name: t for t in (RelayTransport, DirectTransport, CheckpointTransport, ShmTransport, AutoTransport)
}
DEFAULT_TRANSPORT = RelayTransport.name


def make_transport(name: str, targets: list[str], context: PublishContext, adapter: bool = False) -> WeightTransport:
    """Validate a PublishWeights request before any work; the transport it names ("" = the default). A LoRA
    session's weights (`adapter`) always go as an adapter directory the replicas load (the checkpoint
    transport): megabytes, where the stream transports carry whole models by Hugging Face name."""
    if not targets or any(not address for address in targets):
        raise InvalidArgument("targets is empty or holds an empty address; name each rollout as host:port")
    repeated = sorted({address for address in targets if targets.count(address) > 1})
    if repeated:
        raise InvalidArgument(f"targets names {repeated} more than once; name each rollout once")
    transport = TRANSPORTS.get(name or DEFAULT_TRANSPORT)
    if transport is None:
        raise InvalidArgument(f"unknown transport {name!r}; use one of {list(TRANSPORTS)}")
    return CheckpointTransport(context) if adapter else transport(context)


__all__ = [
    "TRANSPORTS",
    "PublishContext",
    "ReplicaResult",
    "WeightSource",
    "WeightTransport",
    "make_transport",
    "raise_first_failure",
]
