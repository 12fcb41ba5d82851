"""A KV sender and a receiver in two processes, as a prefill and a decode worker are, for timing
transfers (bench.gpu_kv_transfer) without the two ends sharing one event loop and one GIL.

The receiver process (`python -m bench.kv_transfer_pair ...`) owns a paged cache and a
`KVReceiver` of the chosen transport, prints its endpoint, then takes one JSON command a line on
stdin and answers one JSON line on stdout::

    {"expect": id, "blocks": [...], "deadline": t}  ->  {"expected": id}
              (once the transfer landed)  {"done": id, "ok": true, "landed": t, "sum": s}
    {"quit": true}                                   ->  exits

`landed` is `time.monotonic()` when the receiver saw the transfer complete (one clock for every
process of the machine), so the checksum's own time is not counted; `sum` is the float64 sum of
the received blocks over every layer: the sender compares it with its own sum of the sent
blocks, so a timing run is also a check that the bytes landed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def blocks_sum(caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> float:
    """float64 sum of the given blocks over every layer (keys and values)."""
    index = torch.tensor(list(block_ids), dtype=torch.long, device=caches[0].device)
    return float(sum(c.index_select(1, index).double().sum() for c in caches))


async def _receiver_main(args: argparse.Namespace) -> None:
    from kv_transfer.dispatch import make_receiver

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    shape = (2, args.num_blocks, args.block_size, args.num_kv_heads, args.head_dim)
    caches = [
        torch.zeros(shape, dtype=DTYPES[args.dtype], device=device) for _ in range(args.num_layers)
    ]
    receiver = make_receiver(args.transport, caches, "127.0.0.1", 0)
    await receiver.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: dict[str, Any]) -> None:
        print(json.dumps(obj), flush=True)

    async def report(transfer_id: str, blocks: list[int], future: asyncio.Future[Any]) -> None:
        try:
            await future
        except Exception as exc:  # the sender sees its own error; report ours
            say({"done": transfer_id, "ok": False, "error": repr(exc)})
            return
        landed = time.monotonic()
        say({"done": transfer_id, "ok": True, "landed": landed, "sum": blocks_sum(caches, blocks)})

    say({"endpoint": receiver.endpoint})
    tasks = set()
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("quit"):
            break
        transfer_id, blocks = command["expect"], command["blocks"]
        future = receiver.expect(transfer_id, blocks, command["deadline"])
        say({"expected": transfer_id})
        task = asyncio.create_task(report(transfer_id, blocks, future))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await receiver.close()


class RemoteReceiver:
    """The receiver process, driven from the sender's event loop (`async with`)."""

    def __init__(self, transport: str, device: str, dtype: str, cache_shape: Sequence[int]):
        self.transport, self.device, self.dtype = transport, device, dtype
        self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim = (
            cache_shape
        )
        self.endpoint = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._done: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._expected: dict[str, asyncio.Future[None]] = {}
        self._reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RemoteReceiver:
        cmd = [
            sys.executable, "-m", "bench.kv_transfer_pair",
            "--transport", self.transport, "--device", self.device, "--dtype", self.dtype,
            "--num-layers", str(self.num_layers), "--num-blocks", str(self.num_blocks),
            "--block-size", str(self.block_size), "--num-kv-heads", str(self.num_kv_heads),
            "--head-dim", str(self.head_dim),
        ]  # fmt: skip
        self._proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        first = json.loads(await asyncio.wait_for(self._proc.stdout.readline(), 300))
        self.endpoint = first["endpoint"]
        self._reader_task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(b'{"quit": true}\n')
        await self._proc.stdin.drain()
        await asyncio.wait_for(self._proc.wait(), 60)
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            msg = json.loads(line)
            if "expected" in msg:
                self._expected.pop(msg["expected"]).set_result(None)
            elif "done" in msg and msg["done"] in self._done:
                self._done[msg["done"]].set_result(msg)

    async def expect(self, transfer_id: str, blocks: Sequence[int], deadline: float) -> None:
        """Reserve `blocks` on the receiver for `transfer_id`; returns once it is registered."""
        assert self._proc is not None and self._proc.stdin is not None
        loop = asyncio.get_running_loop()
        self._expected[transfer_id] = loop.create_future()
        self._done[transfer_id] = loop.create_future()
        command = {"expect": transfer_id, "blocks": list(blocks), "deadline": deadline}
        self._proc.stdin.write((json.dumps(command) + "\n").encode())
        await self._proc.stdin.drain()
        await self._expected[transfer_id]

    async def done(self, transfer_id: str) -> dict[str, Any]:
        """The receiver's report once the transfer landed (or failed)."""
        try:
            return await self._done[transfer_id]
        finally:
            del self._done[transfer_id]


async def time_transfers(
    sender: Any,
    receiver: RemoteReceiver,
    src_caches: Sequence[torch.Tensor],
    num_blocks: int,
    repeats: int,
    warmup: int,
    seed: int = 0,
) -> list[float]:
    """Seconds of each timed transfer of `num_blocks` random blocks into random reserved ones,
    from the sender's call until the receiver's report; checks every transfer's checksum."""
    import random

    from kv_transfer import TransferSpec, gather_blocks
    from prefill_service.server import CopiedLayers

    rng = random.Random(seed)
    total_src, total_dst = src_caches[0].shape[1], receiver.num_blocks
    times = []
    for i in range(warmup + repeats):
        src_ids = rng.sample(range(total_src), num_blocks)
        dst_ids = tuple(rng.sample(range(total_dst), num_blocks))
        gathered = gather_blocks(src_caches, src_ids)
        source = CopiedLayers([gathered.layer(j) for j in range(gathered.num_layers)])
        want = blocks_sum(src_caches, src_ids)
        if src_caches[0].is_cuda:
            torch.cuda.synchronize(src_caches[0].device)
        spec = TransferSpec(f"t{i}-{seed}", receiver.endpoint, dst_ids, time.time() + 60)
        await receiver.expect(spec.transfer_id, dst_ids, spec.deadline)
        start = time.monotonic()
        await sender.send(spec, source)
        report = await receiver.done(spec.transfer_id)
        elapsed = report.get("landed", time.monotonic()) - start
        if not report["ok"] or abs(report["sum"] - want) > 1e-6 * max(1.0, abs(want)):
            raise RuntimeError(f"transfer {spec.transfer_id} did not land: {report}, want {want}")
        if i >= warmup:
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description="the receiver process of a timed KV transfer")
    parser.add_argument("--transport", choices=["tcp", "nccl", "cuda-ipc"], required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    for name in ("num-layers", "num-blocks", "block-size", "num-kv-heads", "head-dim"):
        parser.add_argument(f"--{name}", type=int, required=True)
    asyncio.run(_receiver_main(parser.parse_args()))


if __name__ == "__main__":
    main()
