"""The relay chain's wire contract (PushWeights call metadata), shared by the learner that starts a relay
and the rollout replicas that carry it on (rollout/relay.py); see PushWeights in rollout.proto."""

from __future__ import annotations

from collections.abc import Sequence

from protos.errors import InvalidArgument

RELAY_TO_METADATA = "anvil-relay-to"
"""Comma-separated host:port of the replicas after this one, in chain order."""
RELAY_STALL_METADATA = "anvil-relay-stall-s"
"""Seconds the next replica may stop taking bytes before the relay to it is abandoned."""
DEFAULT_STALL_S = 10.0
PUSH_METHOD = "/anvil.v1.RolloutService/PushWeights"


def relay_chain(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[list[str], float]:
    """The chain after this replica and the stall limit, from a PushWeights call's metadata."""
    values = {key: value.decode() if isinstance(value, bytes) else value for key, value in metadata}
    chain = [address.strip() for address in values.get(RELAY_TO_METADATA, "").split(",") if address.strip()]
    try:
        stall_s = float(values.get(RELAY_STALL_METADATA, DEFAULT_STALL_S))
    except ValueError:
        raise InvalidArgument(f"{RELAY_STALL_METADATA} must be a number of seconds") from None
    if not stall_s > 0:
        raise InvalidArgument(f"{RELAY_STALL_METADATA} is {stall_s}; it must be > 0")
    return chain, stall_s


def relay_metadata(chain: Sequence[str], stall_s: float) -> tuple[tuple[str, str], ...]:
    """Call metadata that makes the receiving replica relay to `chain`."""
    return ((RELAY_TO_METADATA, ",".join(chain)), (RELAY_STALL_METADATA, f"{stall_s:g}"))
