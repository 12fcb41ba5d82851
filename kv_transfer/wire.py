"""The tcp transport's wire format: length-prefixed frames over one connection per transfer.

Every frame is an 8-byte big-endian payload length, then the payload::

    sender                                            receiver
    header  JSON {magic, version, transfer_id,  --->
                  dst_block_ids, num_layers,
                  layer: {shape, dtype},
                  extras: [{name, shape, dtype}]}
                                                <---  reply JSON {status: "accept" | "error"}
    layer 0 raw bytes                           --->  written into kv_caches[0] at once
    ...
    layer L-1 raw bytes                         --->
    extra 0 raw bytes ...                       --->
                                                <---  reply JSON {status: "ok" | "error"}

Raw frames are a contiguous tensor's bytes in host (little-endian) order, any dtype, bfloat16
included; their length must equal what the header announced. The receiver may send an error
reply at any point and close; the sender stops as soon as it sees one.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kv_transfer.base import KVTransferError

MAGIC = "baton-kv"
VERSION = 1
MAX_JSON_BYTES = 1 << 20  # a header or reply frame above this is refused
READ_CHUNK_BYTES = 1 << 20  # raw frames are read in pieces of at most this size

_LENGTH = struct.Struct("!Q")
_DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint8", "bool",
)
DTYPES: dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of `dtype` ("bfloat16", ...); `KVTransferError` if it has none."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise KVTransferError(f"dtype {dtype} cannot be transferred")
    return name


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Name, shape and dtype of one raw frame's tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Size of the tensor's raw frame payload, in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorMeta:
        """The metadata of `tensor`, under `name`."""
        return cls(name, tuple(tensor.shape), tensor.dtype)

    def check(self, tensor: torch.Tensor) -> None:
        """`KVTransferError` unless `tensor` has this shape and dtype."""
        if tuple(tensor.shape) != self.shape or tensor.dtype != self.dtype:
            raise KVTransferError(
                f"{self.name}: {tuple(tensor.shape)} {tensor.dtype} differs from the announced "
                f"{self.shape} {self.dtype}"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}

    @classmethod
    def from_json(cls, obj: Any) -> TensorMeta:
        """Parse and validate; `KVTransferError` on anything malformed."""
        if not isinstance(obj, Mapping):
            raise KVTransferError(f"bad tensor description: {obj!r}")
        name, shape, dtype = obj.get("name"), obj.get("shape"), obj.get("dtype")
        if not isinstance(name, str) or not isinstance(shape, list) or dtype not in DTYPES:
            raise KVTransferError(f"bad tensor description: {obj!r}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise KVTransferError(f"bad tensor shape: {shape!r}")
        return cls(name, tuple(shape), DTYPES[dtype])


@dataclass(frozen=True, slots=True)
class TransferHeader:
    """The first frame of a transfer: what follows it. Every layer has the shape of `layer`."""

    transfer_id: str
    dst_block_ids: tuple[int, ...]
    num_layers: int
    layer: TensorMeta
    extras: tuple[TensorMeta, ...]

    @classmethod
    def describe(
        cls,
        transfer_id: str,
        dst_block_ids: Sequence[int],
        num_layers: int,
        layer0: torch.Tensor,
        extras: Mapping[str, Any],
    ) -> TransferHeader:
        """The header announcing `num_layers` layers shaped like `layer0`, then `extras`."""
        metas = tuple(TensorMeta.of(name, t) for name, t in extras.items())
        layer = TensorMeta.of("layer", layer0)
        return cls(transfer_id, tuple(dst_block_ids), num_layers, layer, metas)

    def to_json(self) -> dict[str, Any]:
        return {
            "magic": MAGIC,
            "version": VERSION,
            "transfer_id": self.transfer_id,
            "dst_block_ids": list(self.dst_block_ids),
            "num_layers": self.num_layers,
            "layer": self.layer.to_json(),
            "extras": [m.to_json() for m in self.extras],
        }

    @classmethod
    def from_json(cls, obj: Any) -> TransferHeader:
        """Parse and validate; `KVTransferError` on anything malformed."""
        if not isinstance(obj, Mapping) or obj.get("magic") != MAGIC:
            raise KVTransferError("not a baton KV transfer header")
        if obj.get("version") != VERSION:
            raise KVTransferError(f"unsupported header version {obj.get('version')!r}")
        tid, num_layers, extras = obj.get("transfer_id"), obj.get("num_layers"), obj.get("extras")
        if not isinstance(tid, str) or not isinstance(num_layers, int) or num_layers < 1:
            raise KVTransferError(f"bad transfer id or layer count in header: {obj!r}")
        dst = obj.get("dst_block_ids")
        if not isinstance(dst, list) or not all(type(b) is int for b in dst):
            raise KVTransferError("bad dst_block_ids in header")
        if not isinstance(extras, list):
            raise KVTransferError("bad extras list in header")
        metas = tuple(TensorMeta.from_json(m) for m in extras)
        if len({m.name for m in metas}) != len(metas):
            raise KVTransferError("repeated extra tensor names in header")
        return cls(tid, tuple(dst), num_layers, TensorMeta.from_json(obj.get("layer")), metas)


def json_frame(obj: Any) -> bytes:
    """`obj` as one length-prefixed JSON frame."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return _LENGTH.pack(len(payload)) + payload


def reply_frame(status: str, message: str = "") -> bytes:
    """A receiver reply: status "accept", "ok" or "error", with a message for errors."""
    return json_frame({"status": status, "message": message})


def tensor_frame_prefix(tensor: torch.Tensor) -> bytes:
    """The length prefix of `tensor`'s raw frame."""
    return _LENGTH.pack(tensor.numel() * tensor.element_size())


def tensor_payload(tensor: torch.Tensor) -> memoryview:
    """`tensor`'s bytes as a flat memoryview (copied to CPU and made contiguous if needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


async def read_json_frame(reader: asyncio.StreamReader) -> Any:
    """Read one JSON frame; `KVTransferError` if it is too large or not JSON."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_JSON_BYTES:
        raise KVTransferError(f"JSON frame of {length} bytes exceeds {MAX_JSON_BYTES}")
    try:
        return json.loads(await reader.readexactly(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KVTransferError(f"malformed JSON frame: {exc}") from exc


async def read_tensor_frame(
    reader: asyncio.StreamReader, meta: TensorMeta, buffer: torch.Tensor | None = None
) -> torch.Tensor:
    """Read one raw frame of `meta`'s tensor, into `buffer` (uint8, meta.nbytes) if given.

    Returns a view of the bytes with `meta`'s shape and dtype. `KVTransferError` if the frame
    length differs from `meta.nbytes`; `asyncio.IncompleteReadError` if the connection ends.
    """
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length != meta.nbytes:
        raise KVTransferError(f"{meta.name}: frame of {length} bytes, expected {meta.nbytes}")
    if buffer is None:
        buffer = torch.empty(length, dtype=torch.uint8)
    view = buffer.numpy().data
    done = 0
    while done < length:
        chunk = await reader.read(min(length - done, READ_CHUNK_BYTES))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", length - done)
        view[done : done + len(chunk)] = chunk
        done += len(chunk)
    return buffer.view(meta.dtype).view(meta.shape)
