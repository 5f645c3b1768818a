"""8-bit tensors on the wire: blockwise absmax quantization, our own, correct with torch 2.14 and numpy 2.

Why our own: hivemind 1.1.12's 8-bit quantizers cannot decode under numpy 2 (their ``extract`` calls ``int()`` on a
one-element array, an error there: ``tests/peer/test_quantization.py``). hivemind logs the failed parts and still
reports the round as done, and each peer keeps its own values: the "average" is no average at all (README,
Performance, has by how far it missed).

The scheme: the flat tensor is cut into blocks of ``BLOCK`` values; each block keeps its largest magnitude as a
float32 scale and each value as ``round(127 * value / scale)`` in one signed byte. Decoding multiplies back. Every
value's error is at most half a step, ``scale / 254`` of its own block, and zero blocks stay exactly zero; the wire
holds 1 byte per value plus 4 bytes per block (``BLOCK = 1024``: 8.03 bits per value, a 3.98x saving over fp32).

``Blockwise8BitCompression`` speaks hivemind's compression interface. It travels under the wire name
``UNIFORM_8BIT`` (the protocol has a fixed list of names): ``hivemind_averagers`` registers it as that name's decoder,
so every vitpeer peer encodes and decodes 8-bit tensors this way; the run's fingerprint includes the wire format, so
a peer that would decode differently is refused before it averages.
"""

from __future__ import annotations

import numpy as np
import torch
from hivemind.compression import Float16Compression, NoCompression
from hivemind.compression.base import CompressionBase, CompressionInfo
from hivemind.proto import runtime_pb2

BLOCK = 1024
"""Values per block: one float32 scale each."""


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [n], scales float32 [blocks])`` of a tensor, flattened and padded to whole blocks."""
    flat = tensor.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks * (127.0 / safe[:, None])).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: flat.numel()], scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``quantize`` encoded."""
    count = codes.numel()
    pad = (-count) % BLOCK
    blocks = torch.nn.functional.pad(codes.to(torch.float32), (0, pad)).view(-1, BLOCK)
    return (blocks * (scales[:, None] / 127.0)).reshape(-1)[:count].reshape(shape)


class Blockwise8BitCompression(CompressionBase):
    """hivemind's compression interface over ``quantize``/``dequantize``. Wire layout of ``Tensor.buffer``: int64
    block count, float32 scales, int8 codes."""

    # the ignores below: protobuf makes runtime_pb2's names at import, hivemind ships no .pyi: no checker sees them
    compression_type = runtime_pb2.UNIFORM_8BIT  # pyright: ignore[reportAttributeAccessIssue]

    def compress(
        self,
        tensor: torch.Tensor,
        info: CompressionInfo,
        allow_inplace: bool = False,
    ) -> runtime_pb2.Tensor:  # pyright: ignore[reportAttributeAccessIssue]
        if not torch.is_floating_point(tensor):
            raise ValueError(f"8-bit compression takes floating-point tensors, got {tensor.dtype}")
        codes, scales = quantize(tensor)
        header = np.array([scales.numel()], dtype=np.int64).tobytes()
        return runtime_pb2.Tensor(  # pyright: ignore[reportAttributeAccessIssue]
            compression=self.compression_type,
            buffer=header + scales.numpy().tobytes() + codes.numpy().tobytes(),
            size=tensor.shape,
            dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad,
        )

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:  # pyright: ignore[reportAttributeAccessIssue]
        buffer = serialized_tensor.buffer
        blocks = int(np.frombuffer(buffer, dtype=np.int64, count=1)[0])
        scales = np.frombuffer(buffer, dtype=np.float32, count=blocks, offset=8)
        codes = np.frombuffer(buffer, dtype=np.int8, offset=8 + 4 * blocks)
        shape = tuple(serialized_tensor.size)
        values = dequantize(torch.from_numpy(codes.copy()), torch.from_numpy(scales.copy()), shape)
        return values.to(getattr(torch, serialized_tensor.dtype))

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return (8 + 32 / BLOCK) / torch.finfo(info.descriptor.dtype).bits


def compression(name: str) -> CompressionBase:
    """The codec ``swarm.compression`` names: ``none`` (fp32), ``fp16`` or ``8bit`` (``Blockwise8BitCompression``)."""
    codecs: dict[str, type[CompressionBase]] = {
        "none": NoCompression,
        "fp16": Float16Compression,
        "8bit": Blockwise8BitCompression,
    }
    return codecs[name]()
