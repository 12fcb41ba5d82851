"""`python -m prefill_service --model DIR [--port P]`: a prefill worker."""

from __future__ import annotations

import argparse

from engine.async_core import AsyncEngineCore
from kv_transfer.tcp import TcpKVSender
from prefill_service.server import ADD_TO_SERVER, SERVICE_NAME, PrefillServicer
from worker_common.main import run_worker, worker_parser
from worker_common.metrics import WorkerMetrics
from worker_common.server import Registration


async def setup(
    args: argparse.Namespace, engine: AsyncEngineCore, metrics: WorkerMetrics
) -> list[Registration]:
    servicer = PrefillServicer(engine, TcpKVSender(), metrics)
    return [(ADD_TO_SERVER, servicer, SERVICE_NAME)]


def main() -> None:
    run_worker(worker_parser(__doc__ or "").parse_args(), "prefill", setup)


if __name__ == "__main__":
    main()
