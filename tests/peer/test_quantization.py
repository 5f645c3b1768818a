"""What averaged tensors travel as: vitpeer's own 8-bit codec, and the error of a real 2-peer average in fp16 and
8-bit against the exact mean (``core.averaging.quantization``,
``core.averaging.hivemind_averagers.use_our_8bit_codec``)."""

from __future__ import annotations

import multiprocessing
import time

import hivemind
import numpy as np
import pytest
import torch
from hivemind.compression import CompressionInfo, Float16Compression, Uniform8BitQuantization
from hivemind.proto import runtime_pb2

from vitpeer.peer.core.averaging.hivemind_averagers import use_our_8bit_codec
from vitpeer.peer.core.averaging.quantization import BLOCK, Blockwise8BitCompression, dequantize, quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_value_is_within_half_a_step_of_its_block(dtype):
    torch.manual_seed(0)
    values = (torch.randn(3 * BLOCK + 17) * torch.logspace(-3, 2, 3 * BLOCK + 17)).to(dtype)
    codes, scales = quantize(values)
    back = dequantize(codes, scales, values.shape)
    flat = values.float()
    blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % BLOCK)).view(-1, BLOCK)
    half_step = (blocks.abs().amax(dim=1) / 254).repeat_interleave(BLOCK)[: flat.numel()]
    assert codes.dtype == torch.int8 and scales.numel() == 4
    assert torch.all((back - flat).abs() <= half_step * (1 + 1e-6))


def test_zero_blocks_stay_zero_and_the_wire_keeps_shape_and_dtype():
    codec = Blockwise8BitCompression()
    values = torch.zeros(5, 300, dtype=torch.float16)
    values[4, :10] = torch.arange(10, dtype=torch.float16)
    serialized = codec.compress(values, CompressionInfo.from_tensor(values))
    back = codec.extract(serialized)
    assert back.shape == values.shape and back.dtype == torch.float16
    assert torch.equal(back[:4], values[:4])
    assert len(serialized.buffer) == 8 + 4 * 2 + values.numel()  # header, two block scales, one byte a value


def test_hivemind_s_own_8bit_cannot_decode_under_numpy_2():
    """Why vitpeer brings its own codec: hivemind 1.1.12 calls int() on a one-element array when it decodes."""
    assert int(np.__version__.split(".")[0]) >= 2
    codebook, indices = np.linspace(-1, 1, 256, dtype=np.float32), np.arange(1000, dtype=np.uint8)
    serialized = runtime_pb2.Tensor(  # what hivemind's compress writes (not called here: it starts torch's
        compression=runtime_pb2.UNIFORM_8BIT,  # quantized backend, and processes forked after that hang)
        buffer=np.int64(256).tobytes() + codebook.tobytes() + indices.tobytes(),
        size=[1000],
        dtype="float32",
    )
    with pytest.raises(TypeError):
        Uniform8BitQuantization().extract(serialized)


def _average(maddrs, seed, codec_name, results):
    torch.set_num_threads(1)  # a forked child must not use the thread pool its parent's torch may have started
    use_our_8bit_codec()  # what every vitpeer peer does before its averagers start
    codec = {"fp16": Float16Compression, "8bit": Blockwise8BitCompression}[codec_name]()
    torch.manual_seed(seed)
    values = torch.randn(200_000) * (1 + seed)
    dht = hivemind.DHT(start=True, initial_peers=maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = hivemind.DecentralizedAverager(
        [values.clone()], dht, prefix="quantization", start=True, target_group_size=2, min_matchmaking_time=2.0,
        compression=codec,
    )  # fmt: skip
    gathered = averager.step(timeout=60)
    with averager.get_tensors() as tensors:
        results.put((seed, values, tensors[0].clone(), gathered is not None))
    time.sleep(1.0)  # let the other peer finish reading its parts before this one goes
    averager.shutdown()
    dht.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("codec_name, bound", [("fp16", 2e-3), ("8bit", 1.5e-2)])
def test_a_two_peer_average_is_within_the_codec_s_error_of_the_exact_mean(codec_name, bound):
    """Bound: the RMS error against the exact mean, relative to the mean's RMS. Each value of an all-reduce is
    compressed twice (a peer's part to its reducer, the average back as a delta), so 8-bit's bound is a few half
    steps (1/254 of a block's largest magnitude, about 1.3 % of the RMS of a normal block)."""
    context = multiprocessing.get_context("fork")
    bootstrap = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    results = context.Queue()
    maddrs = [str(addr) for addr in bootstrap.get_visible_maddrs()]
    peers = [context.Process(target=_average, args=(maddrs, seed, codec_name, results)) for seed in (0, 1)]
    try:
        for peer in peers:
            peer.start()
        found = {
            seed: (values, averaged, ok) for seed, values, averaged, ok in (results.get(timeout=90) for _ in peers)
        }
    finally:
        for peer in peers:
            peer.join(timeout=30)
            if peer.is_alive():
                peer.kill()
        bootstrap.shutdown()
    mean = (found[0][0] + found[1][0]) / 2
    for _, averaged, ok in found.values():
        assert ok, "the round found no group"
        error = (averaged - mean).pow(2).mean().sqrt() / mean.pow(2).mean().sqrt()
        assert error < bound, f"{codec_name}: relative RMS error {error:.2e} against the exact mean"
