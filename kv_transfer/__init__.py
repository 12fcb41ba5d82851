"""Moving a prompt's KV blocks from a prefill worker's cache into a decode worker's reserved blocks.

One interface (`KVSender`, `KVReceiver`, `TransferSpec`, in `base`) over several transports:
`tcp` (between hosts, or processes on CPU), `local` (one process), `nccl` (GPU to GPU, in
`kv_transfer.nccl`: imported on demand, it needs cupy), `cuda-ipc` (processes sharing one GPU,
in `kv_transfer.cuda_ipc`); `dispatch` picks one by flag or endpoint. `blocks` gathers and
scatters blocks of a paged cache.
"""

from kv_transfer.base import KVLayerSource, KVReceiver, KVSender, KVTransferError, TransferSpec
from kv_transfer.blocks import gather_blocks, scatter_layer
from kv_transfer.local import LocalKVReceiver, LocalKVSender
from kv_transfer.tcp import TcpKVReceiver, TcpKVSender

__all__ = [
    "KVLayerSource",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "LocalKVReceiver",
    "LocalKVSender",
    "TcpKVReceiver",
    "TcpKVSender",
    "TransferSpec",
    "gather_blocks",
    "scatter_layer",
]
