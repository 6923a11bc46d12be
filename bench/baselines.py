"""Same-run baselines every transport is compared against: memcpy, loopback TCP, and raw gRPC.

Each takes the payload size and returns a Timing whose `num_bytes` is that size, so ratios are plain
throughput ratios. The raw gRPC baselines talk to `bench.raw_grpc_server` in its own process: bytes
messages without protobuf framing, the floor any gRPC transport of the same bytes can reach.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np

from bench.common import MiB, Timing, time_async, time_sync
from bench.raw_grpc_server import STREAM_METHOD, UNARY_METHOD
from coordinator.launcher import ServiceProcess, start_service
from protos.channels import open_channel

DEFAULT_CHUNK = 4 * MiB


def memcpy(num_bytes: int, repeats: int) -> Timing:
    """One copy of `num_bytes` between two preallocated buffers (numpy's memcpy)."""
    source = np.random.default_rng(0).integers(0, 255, num_bytes, dtype=np.uint8)
    target = np.empty_like(source)
    return time_sync("baseline: memcpy", lambda: np.copyto(target, source), repeats, num_bytes=num_bytes)


def loopback_tcp(num_bytes: int, repeats: int, chunk: int = DEFAULT_CHUNK) -> Timing:
    """Python sockets on 127.0.0.1: sendall of `chunk`-sized memoryviews into a recv_into loop."""
    payload = memoryview(np.ones(num_bytes, dtype=np.uint8))
    sink = bytearray(chunk)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Semaphore(0)

    def receive(connection: socket.socket) -> None:
        view = memoryview(sink)
        with connection:
            while True:
                remaining = num_bytes
                while remaining:
                    got = connection.recv_into(view, min(chunk, remaining))
                    if not got:
                        return
                    remaining -= got
                done.release()

    sender = socket.create_connection(("127.0.0.1", port))
    connection, _ = listener.accept()
    receiver = threading.Thread(target=receive, args=(connection,), daemon=True)
    receiver.start()

    def send_once() -> None:
        for offset in range(0, num_bytes, chunk):
            sender.sendall(payload[offset : offset + chunk])
        done.acquire()

    try:
        return time_sync("baseline: loopback TCP", send_once, repeats, num_bytes=num_bytes)
    finally:
        sender.close()
        listener.close()
        receiver.join(timeout=5)


@contextlib.asynccontextmanager
async def raw_grpc_server() -> AsyncIterator[ServiceProcess]:
    """`bench.raw_grpc_server` in its own process (its `address` and `pid`)."""
    with tempfile.TemporaryDirectory(prefix="anvil-bench-") as logs:
        process: ServiceProcess = await start_service("raw-grpc", "bench.raw_grpc_server", [], Path(logs), {}, 60)
        try:
            yield process
        finally:
            process.stop()


def bytes_chunks(num_bytes: int, chunk: int = DEFAULT_CHUNK) -> list[bytes]:
    """The payload pre-cut into bytes messages (cut before timing: the raw baseline pays no framing)."""
    block = np.ones(chunk, dtype=np.uint8).tobytes()
    sizes = [min(chunk, num_bytes - offset) for offset in range(0, num_bytes, chunk)]
    return [block if size == chunk else block[:size] for size in sizes]


def raw_stream_sender(channel, num_bytes: int, chunk: int = DEFAULT_CHUNK) -> Callable[[], Awaitable[None]]:
    """One client stream of `num_bytes` as raw `chunk`-sized bytes messages to the raw server, per call."""
    messages = bytes_chunks(num_bytes, chunk)
    call = channel.stream_unary(STREAM_METHOD)

    async def send() -> None:
        reply = await call(iter(messages))
        assert int.from_bytes(reply, "little") == num_bytes

    return send


def raw_stream_name(chunk: int) -> str:
    return f"baseline: raw gRPC stream ({chunk // MiB} MiB msgs)"


async def raw_grpc_stream(address: str, num_bytes: int, repeats: int, chunk: int = DEFAULT_CHUNK) -> Timing:
    """A client stream of raw bytes messages of `chunk` bytes to the raw server, until it acknowledges."""
    async with open_channel(address) as channel:
        send = raw_stream_sender(channel, num_bytes, chunk)
        return await time_async(raw_stream_name(chunk), send, repeats, num_bytes=num_bytes)


async def raw_grpc_unary(address: str, payload: bytes, repeats: int) -> Timing:
    """One raw bytes message of the payload's size, request and tiny reply."""
    async with open_channel(address) as channel:
        call = channel.unary_unary(UNARY_METHOD)

        async def send() -> None:
            await call(payload)

        return await time_async("baseline: raw gRPC unary", send, repeats, num_bytes=len(payload))
