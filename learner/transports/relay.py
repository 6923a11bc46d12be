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
from protos.weights_codec import TensorBytes, framed_push_requests
from protos.weights_digest import tree_digest
from protos.weights_relay import DEFAULT_STALL_S, PUSH_METHOD, relay_metadata


class RelayTransport(DirectTransport):
    name = "stream"

    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        snapshot = await asyncio.to_thread(tensors_as_bytes, source.named_weights())
        snapshot.sort(key=lambda tensor: tensor.name)
        if len(set(targets)) < 2:
            return await self.send_directly(version, snapshot, targets)
        hashing = asyncio.ensure_future(
            asyncio.to_thread(tree_digest, [(t.name, t.dtype, t.shape, t.data) for t in snapshot])
        )
        start = time.perf_counter()
        results: dict[str, ReplicaResult] = {}
        channels = {address: open_channel(address, api_key=self.context.api_key) for address in targets}
        try:
            stubs = {address: rollout_pb2_grpc.RolloutServiceStub(channel) for address, channel in channels.items()}
            begin = rollout_pb2.BeginWeightUpdateRequest(version=version)
            opened = await asyncio.gather(*(self.attempt(a, stubs[a].BeginWeightUpdate(begin)) for a in targets))
            chain = []
            for address, (_, error) in zip(targets, opened, strict=True):
                if error is None:
                    chain.append(address)
                else:
                    results[address] = ReplicaResult(address, 0, time.perf_counter() - start, error)
            if chain:
                failed, misses = await self._relay(channels[chain[0]], version, snapshot, chain)
                for address, error in failed.items():
                    results[address] = ReplicaResult(address, 0, time.perf_counter() - start, error)
                digest = await hashing
                staged = [a for a in chain if a not in misses and a not in failed]
                commit = rollout_pb2.CommitWeightUpdateRequest(version=version, digest=digest)
                commits = (self.attempt(a, stubs[a].CommitWeightUpdate(commit)) for a in staged)
                committed = await asyncio.gather(*commits)
                sent = sum(memoryview(t.data).nbytes for t in snapshot)
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
        return [results[address] for address in targets]

    async def _relay(
        self, head: grpc.aio.Channel, version: int, snapshot: list[TensorBytes], chain: list[str]
    ) -> tuple[dict[str, AnvilError], dict[str, AnvilError]]:
        """Stream the update to `chain[0]`, relayed down the rest of `chain`. Who did not stage all of it:
        (replicas that failed themselves - not worth a direct send, which would fail or stall alike -,
        replicas the relay never reached because one before them failed)."""
        push = head.stream_unary(
            PUSH_METHOD,
            request_serializer=None,  # already wire bytes
            response_deserializer=rollout_pb2.PushWeightsResponse.FromString,
        )
        timeout = self.context.target_timeout_s
        stall_s = min(DEFAULT_STALL_S, timeout / 2) if timeout else DEFAULT_STALL_S
        metadata = relay_metadata(chain[1:], stall_s)
        response, error = await self.attempt(chain[0], push(framed_push_requests(version, snapshot), metadata=metadata))
        if response is None:  # the head itself failed: it is not sent to again, the rest are
            behind = Unavailable(f"the relay through rollout {chain[0]} failed before reaching it")
            return {chain[0]: error or behind}, {address: behind for address in chain[1:]}
        outcome = {r.address: r for r in response.relayed}
        failed, missed = {}, {}
        for address in chain[1:]:
            result = outcome.get(address)
            if result is None or not result.ok:
                error = Unavailable(result.error if result is not None else f"rollout {address}: not relayed")
                (failed if result is not None and result.reached else missed)[address] = error
        return failed, missed
