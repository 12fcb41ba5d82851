"""`python -m decode_service --model DIR [--role decode|colocated] [--port P] [--kv-port K]
[--kv-transport tcp|nccl|cuda-ipc]`."""

from __future__ import annotations

import argparse

import torch

from decode_service.server import (
    COLOCATED_SERVICE_NAME,
    DECODE_SERVICE_NAME,
    ColocatedServicer,
    DecodeServicer,
)
from engine.async_core import AsyncEngineCore
from kv_transfer.base import KVReceiver
from kv_transfer.dispatch import TRANSPORTS, make_receiver
from proto.baton.v1 import worker_pb2_grpc
from worker_common.main import parse_worker_args, run_worker, worker_parser
from worker_common.metrics import WorkerMetrics
from worker_common.server import Registration


async def setup(
    args: argparse.Namespace, engine: AsyncEngineCore, metrics: WorkerMetrics
) -> list[Registration]:
    if args.role == "colocated":
        servicer = ColocatedServicer(engine, metrics)
        add = worker_pb2_grpc.add_ColocatedWorkerServicer_to_server
        return [(add, servicer, COLOCATED_SERVICE_NAME)]

    def receiver(kv_caches: list[torch.Tensor]) -> KVReceiver:
        return make_receiver(args.kv_transport, kv_caches, args.host, args.kv_port)

    decode = DecodeServicer(engine, receiver, metrics)
    await decode.start()
    add_decode = worker_pb2_grpc.add_DecodeWorkerServicer_to_server
    return [(add_decode, decode, DECODE_SERVICE_NAME)]


def build_parser() -> argparse.ArgumentParser:
    """The decode (or colocated) worker's command line: the shared worker flags and its own."""
    parser = worker_parser(__doc__ or "")
    parser.add_argument("--role", choices=["decode", "colocated"], default="decode")
    parser.add_argument("--kv-port", type=int, default=0, help="KV receiver port (0: a free one)")
    parser.add_argument(
        "--kv-transport",
        choices=TRANSPORTS,
        default="tcp",
        help="how prefill workers push KV here: tcp, nccl (prefill on another GPU), or cuda-ipc"
        " (prefill on this GPU)",
    )
    return parser


def main() -> None:
    args = parse_worker_args(build_parser())
    run_worker(args, args.role, setup)


if __name__ == "__main__":
    main()
