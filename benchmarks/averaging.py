"""Averaging cost: one all-reduce of ViT-B/16-sized gradients between 2 peers on loopback, against the limit.

For each compression, two hivemind averagers (each with its own DHT node and p2p daemon, as two peers have) hold one
flat tensor of ``NUMEL`` float32 values. A round is pre-scheduled and the clock starts when both have found their
group (hivemind's ``AWAITING_TRIGGER`` stage), so matchmaking is timed on its own and the all-reduce on its own.
Bytes on the wire are read from the loopback interface's counters (``/proc/net/dev``) around the all-reduce. The
8-bit row is vitpeer's own codec (``core.averaging.quantization.Blockwise8BitCompression``, registered for the wire name
``UNIFORM_8BIT`` by ``use_our_8bit_codec``, as every vitpeer peer does), not hivemind's quantizers.

Each compression's round is compared with two transfers of the bytes that round put on the wire per peer, measured
in the same run (never scaled from another compression's):
- a raw TCP transfer over loopback (``raw_tcp_seconds``): a peer sends half its vector and gets half back in a
  2-peer all-reduce, so pushing its wire bytes once is what the round costs at least;
- the same transfer through two hivemind p2p daemons (``p2p_relay_seconds``): every averaging byte travels
  averager -> Unix socket -> p2pd -> TCP -> p2pd -> Unix socket -> averager, and no hivemind round can be faster
  than that path.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import Float16Compression, NoCompression
from hivemind.p2p import P2P

from vitpeer.peer.core.averaging.hivemind_averagers import use_our_8bit_codec
from vitpeer.peer.core.averaging.quantization import Blockwise8BitCompression

NUMEL = 86_567_656  # vit_base_patch16_224's parameters
COMPRESSIONS = {"none": NoCompression, "fp16": Float16Compression, "8bit": Blockwise8BitCompression}


def loopback_bytes() -> int:
    """Bytes sent through ``lo`` since boot (every local connection; keep the machine otherwise quiet)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmit bytes
    raise RuntimeError("no loopback interface in /proc/net/dev")


def raw_tcp_seconds(nbytes: int, chunk: int = 4 << 20) -> float:
    """Seconds to push ``nbytes`` through one loopback TCP connection (the receiver reads everything)."""
    payload = memoryview(bytearray(chunk))
    with socket.create_server(("127.0.0.1", 0)) as server:
        received = [0]

        def receive() -> None:
            connection, _ = server.accept()
            with connection:
                buffer = bytearray(chunk)
                while received[0] < nbytes:
                    got = connection.recv_into(buffer)
                    if not got:
                        break
                    received[0] += got

        reader = threading.Thread(target=receive)
        reader.start()
        with socket.create_connection(server.getsockname()) as sender:
            started = time.perf_counter()
            left = nbytes
            while left > 0:
                left -= sender.send(payload[: min(chunk, left)])
            reader.join()
            seconds = time.perf_counter() - started
    assert received[0] == nbytes, (received[0], nbytes)
    return seconds


def p2p_relay_seconds(nbytes: int, chunk: int = 1 << 20) -> float:
    """Seconds to push ``nbytes`` from one hivemind p2p daemon to another over loopback, as averagers' bytes go."""

    async def measure() -> float:
        receiver = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        sender = await P2P.create(
            host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await receiver.get_visible_maddrs()
        )
        try:

            async def sink(_, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                received = 0
                while received < nbytes and (got := await reader.read(chunk)):
                    received += len(got)
                writer.write(received.to_bytes(8, "big"))
                await writer.drain()
                writer.close()

            await receiver.add_binary_stream_handler("bench_sink", sink)
            _, reader, writer = await sender.call_binary_stream_handler(receiver.peer_id, "bench_sink")
            payload, left = bytes(chunk), nbytes
            started = time.perf_counter()
            while left > 0:
                writer.write(payload[: min(chunk, left)])
                await writer.drain()
                left -= chunk
            received = int.from_bytes(await reader.readexactly(8), "big")
            seconds = time.perf_counter() - started
            writer.close()
        finally:
            await sender.shutdown()
            await receiver.shutdown()
        assert received == nbytes, (received, nbytes)
        return seconds

    return asyncio.run(measure())


def allreduce_rounds(compression: str, numel: int = NUMEL, rounds: int = 3) -> list[dict[str, float]]:
    """``rounds`` all-reduce rounds between two averagers; per round: matchmaking s, all-reduce s, loopback bytes."""
    use_our_8bit_codec()  # as every vitpeer peer does before its averagers start
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
    options = dict(
        prefix=f"bench_{compression}",
        target_group_size=2,  # the group closes as soon as both are in: matchmaking is not padded to its window
        min_matchmaking_time=2.0,
        request_timeout=1.0,
        compression=COMPRESSIONS[compression](),
        start=True,
    )
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(numel, generator=generator) for _ in range(2)]
    expected = (vectors[0] + vectors[1]) / 2
    averagers = [
        hivemind.DecentralizedAverager([vector.clone()], dht, **options)
        for vector, dht in zip(vectors, (first, second), strict=True)
    ]
    measured = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            controls = [averager.step(require_trigger=True, wait=False, timeout=120) for averager in averagers]
            while any(control.stage == AveragingStage.LOOKING_FOR_GROUP for control in controls):
                time.sleep(0.005)
            grouped = time.perf_counter()
            sent_before = loopback_bytes()
            for control in controls:
                control.allow_allreduce()
            for control in controls:
                control.result()
            done = time.perf_counter()
            measured.append(
                {
                    "matchmaking_s": grouped - started,
                    "allreduce_s": done - grouped,
                    "loopback_bytes": loopback_bytes() - sent_before,
                }
            )
            if len(measured) == 1:  # does the round average? (later rounds average equal vectors)
                errors, relative = [], []
                for averager in averagers:
                    with averager.get_tensors() as (tensor,):
                        errors.append(float((tensor - expected).abs().mean()))
                        relative.append(float((tensor - expected).norm() / expected.norm()))
                measured[0]["mean_abs_error"] = max(errors)
                measured[0]["relative_rms_error"] = max(relative)
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in (second, first):
            dht.shutdown()
    return measured


def run(rounds: int = 3, numel: int = NUMEL) -> dict[str, Any]:
    """Every compression, each against raw TCP and the p2p daemons moving its own wire bytes, in one run."""
    results: dict[str, Any] = {"numel": numel, "fp32_bytes": numel * 4, "compressions": {}}
    for name in COMPRESSIONS:
        measured = allreduce_rounds(name, numel, rounds)
        best = min(measured, key=lambda entry: entry["allreduce_s"])
        wire_bytes_per_peer = best["loopback_bytes"] // 2  # both peers' traffic crosses lo
        raw = min(raw_tcp_seconds(wire_bytes_per_peer) for _ in range(3))
        relay = min(p2p_relay_seconds(wire_bytes_per_peer) for _ in range(2))
        results["compressions"][name] = {
            "rounds": measured,
            "allreduce_s": best["allreduce_s"],
            "median_allreduce_s": sorted(entry["allreduce_s"] for entry in measured)[len(measured) // 2],
            "matchmaking_s": sorted(entry["matchmaking_s"] for entry in measured)[len(measured) // 2],
            "wire_bytes_per_peer": wire_bytes_per_peer,
            "raw_tcp_s": raw,  # this round's wire bytes per peer, pushed once through one loopback TCP connection
            "vs_raw_tcp": best["allreduce_s"] / raw,
            "p2p_relay_floor_s": relay,  # the same bytes through two p2p daemons, one way
            # against the true mean of unit-normal vectors, after the first round
            "mean_abs_error": measured[0]["mean_abs_error"],
            "relative_rms_error": measured[0]["relative_rms_error"],
        }
    return results
