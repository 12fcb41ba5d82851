"""Choosing a transport: the receiver by flag, the sender by each transfer's endpoint scheme.

A decode worker receives over one transport (`--kv-transport tcp|nccl|cuda-ipc`) and advertises
its endpoint; a prefill worker may push to decode workers of any kind, so its sender picks the
transport from the endpoint of each transfer (`tcp://...`, `nccl://...`, `cuda-ipc://...`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kv_transfer.base import KVLayerSource, KVReceiver, KVSender, KVTransferError, TransferSpec
from kv_transfer.tcp import TcpKVReceiver, TcpKVSender

TRANSPORTS = ("tcp", "nccl", "cuda-ipc")
GPU_TRANSPORTS = ("nccl", "cuda-ipc")  # their senders need a GPU prefill worker


def make_receiver(
    transport: str, kv_caches: Sequence[torch.Tensor], host: str, port: int
) -> KVReceiver:
    """The receiver of `transport` over `kv_caches`, listening on `host:port` (0: any port)."""
    if transport == "tcp":
        return TcpKVReceiver(kv_caches, host, port)
    if transport == "nccl":
        from kv_transfer.nccl import NcclKVReceiver

        return NcclKVReceiver(kv_caches, host, port)
    if transport == "cuda-ipc":
        from kv_transfer.cuda_ipc import CudaIpcKVReceiver

        return CudaIpcKVReceiver(kv_caches, host, port)
    raise ValueError(f"kv transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")


class EndpointSender(KVSender):
    """Sends each transfer with the transport its endpoint names; the GPU ones from `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._senders: dict[str, KVSender] = {"tcp": TcpKVSender()}

    def _sender(self, endpoint: str) -> KVSender:
        scheme = endpoint.split("://", 1)[0]
        sender = self._senders.get(scheme)
        if sender is None and scheme in GPU_TRANSPORTS:
            if self.device.type != "cuda":
                raise KVTransferError(f"{endpoint}: a {scheme} receiver needs a GPU prefill worker")
            sender = self._senders[scheme] = gpu_sender(scheme, self.device)
        if sender is None:
            raise KVTransferError(f"unknown KV transport in endpoint {endpoint!r}")
        return sender

    async def send(
        self,
        spec: TransferSpec,
        layers: KVLayerSource,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        await self._sender(spec.endpoint).send(spec, layers, extra)

    async def close(self) -> None:
        for sender in self._senders.values():
            await sender.close()


def gpu_sender(scheme: str, device: torch.device) -> KVSender:
    """A sender of the GPU transport `scheme` ("nccl" or "cuda-ipc") from `device`."""
    if scheme == "nccl":
        from kv_transfer.nccl import NcclKVSender

        return NcclKVSender(device)
    if scheme == "cuda-ipc":
        from kv_transfer.cuda_ipc import CudaIpcKVSender

        return CudaIpcKVSender(device)
    raise ValueError(f"not a GPU KV transport: {scheme!r}")
