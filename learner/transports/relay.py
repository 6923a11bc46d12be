"""The "stream" transport: the weights leave the learner once, whatever the number of replicas.

Every target opens the update (BeginWeightUpdate); the learner streams the chunks to the first one,
which relays each chunk to the next as it arrives, and so on down the chain (rollout/relay.py), so the
hops overlap and the learner's egress is one model. Then every target verifies the digest and swaps
(CommitWeightUpdate, each called by the learner, all at once). A target the relay missed (a replica
before it in the chain failed or stalled) or whose commit failed gets the weights sent directly, as the
"direct" transport would; a target that could not even open the update is reported failed at once.
Each result says whether the target took the relayed bytes (`relayed`) and how many bytes the learner
itself sent it, so PublishWeights reports the learner's egress.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc

from learner.transports.base import ReplicaResult, WeightSource
from learner.transports.stream import DirectTransport, tensors_as_bytes
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import AnvilError, Unavailable
from protos.weights_codec import DeltaBase, TensorBytes, framed_push_requests
from protos.weights_digest import tree_digest
from protos.weights_relay import DEFAULT_STALL_S, PUSH_METHOD, relay_metadata


class RelayTransport(DirectTransport):
    name = "stream"

    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        snapshot = await asyncio.to_thread(tensors_as_bytes, source.named_weights())
        snapshot.sort(key=lambda tensor: tensor.name)
        if len(set(targets)) < 2:
            results = await self.send_directly(version, snapshot, targets, base=self.delta_base())
            await self.remember(version, snapshot, results)
            return results
        hashing = asyncio.ensure_future(
            asyncio.to_thread(tree_digest, [(t.name, t.dtype, t.shape, t.data) for t in snapshot])
        )
        start = time.perf_counter()
        results: dict[str, ReplicaResult] = {}
        channels = {address: open_channel(address, api_key=self.context.api_key) for address in targets}
        try:
            stubs = {address: rollout_pb2_grpc.RolloutServiceStub(channel) for address, channel in channels.items()}
            begin = rollout_pb2.BeginWeightUpdateRequest(version=version, rewind=self.context.rewind)
            opened = await asyncio.gather(*(self.attempt(a, stubs[a].BeginWeightUpdate(begin)) for a in targets))
            chain, base = [], self.delta_base()
            for address, (response, error) in zip(targets, opened, strict=True):
                if error is None:
                    chain.append(address)
                    # One stream for the whole chain: deltas only when every replica in it holds the base.
                    base = base if base is not None and base.held_by(response) else None
                else:
                    results[address] = ReplicaResult(address, 0, time.perf_counter() - start, error)
            if chain:
                failed, misses, sent = await self._relay(channels[chain[0]], version, snapshot, chain, base)
                for address, error in failed.items():
                    egress = sent if address == chain[0] else 0
                    results[address] = ReplicaResult(address, egress, time.perf_counter() - start, error)
                digest = await hashing
                staged = [a for a in chain if a not in misses and a not in failed]
                commit = rollout_pb2.CommitWeightUpdateRequest(version=version, digest=digest)
                commits = (self.attempt(a, stubs[a].CommitWeightUpdate(commit)) for a in staged)
                committed = await asyncio.gather(*commits)
                for address, (_, error) in zip(staged, committed, strict=True):
                    if error is not None:
                        misses[address] = error
                        continue
                    relayed = address != chain[0]
                    results[address] = ReplicaResult(
                        address, 0 if relayed else sent, time.perf_counter() - start, relayed=relayed
                    )
                # Direct sends to whoever the relay missed (the head's egress counts the relayed stream too).
                missed = [a for a in chain if a in misses]
                for result in await self.send_directly(version, snapshot, missed, digest) if missed else []:
                    extra = sent if result.address == chain[0] else 0
                    results[result.address] = replace(
                        result, num_bytes=result.num_bytes + extra, seconds=time.perf_counter() - start
                    )
        finally:
            hashing.cancel()
            for channel in channels.values():
                await channel.close()
        ordered = [results[address] for address in targets]
        await self.remember(version, snapshot, ordered)
        return ordered

    async def _relay(
        self,
        head: grpc.aio.Channel,
        version: int,
        snapshot: list[TensorBytes],
        chain: list[str],
        base: DeltaBase | None,
    ) -> tuple[dict[str, AnvilError], dict[str, AnvilError], int]:
        """Stream the update to `chain[0]`, relayed down the rest of `chain`. Who did not stage all of it:
        (replicas that failed themselves - not worth a direct send, which would fail or stall alike -,
        replicas the relay never reached because one before them failed, data bytes sent)."""
        push = head.stream_unary(
            PUSH_METHOD,
            request_serializer=None,  # already wire bytes
            response_deserializer=rollout_pb2.PushWeightsResponse.FromString,
        )
        timeout = self.context.target_timeout_s
        stall_s = min(DEFAULT_STALL_S, timeout / 2) if timeout else DEFAULT_STALL_S
        metadata = relay_metadata(chain[1:], stall_s)
        sent = [0]
        requests = framed_push_requests(version, snapshot, base=base, sent=sent)
        if base is not None:  # compressing is CPU work: off the event loop, before the transfer
            requests = iter(await asyncio.to_thread(list, requests))
        response, error = await self.attempt(chain[0], push(requests, metadata=metadata))
        if response is None:  # the head itself failed: it is not sent to again, the rest are
            behind = Unavailable(f"the relay through rollout {chain[0]} failed before reaching it")
            return {chain[0]: error or behind}, {address: behind for address in chain[1:]}, sent[0]
        outcome = {r.address: r for r in response.relayed}
        failed, missed = {}, {}
        for address in chain[1:]:
            result = outcome.get(address)
            if result is None or not result.ok:
                error = Unavailable(result.error if result is not None else f"rollout {address}: not relayed")
                (failed if result is not None and result.reached else missed)[address] = error
        return failed, missed, sent[0]
