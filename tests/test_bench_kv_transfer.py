"""The two-process KV transfer timing harness (bench.kv_transfer_pair), over TCP on the CPU; the
GPU benchmark runs the same harness over NCCL."""

from __future__ import annotations

import asyncio

import torch

from bench.kv_transfer_pair import RemoteReceiver, time_transfers
from kv_transfer import TcpKVSender

SHAPE = (3, 32, 4, 2, 8)  # layers, blocks, block_size, kv heads, head_dim


def test_timed_transfers_land_in_another_process():
    num_layers, num_blocks, *rest = SHAPE
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn((2, num_blocks, *rest), generator=gen) for _ in range(num_layers)]

    async def main() -> list[float]:
        sender = TcpKVSender()
        try:
            async with RemoteReceiver("tcp", "cpu", "float32", SHAPE) as receiver:
                assert receiver.endpoint.startswith("tcp://")
                return await time_transfers(sender, receiver, src, 6, repeats=3, warmup=1)
        finally:
            await sender.close()

    times = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(times) == 3 and all(t > 0 for t in times)


def test_the_gpu_benchmarks_tokenizer_gives_every_token_text(tmp_path):
    """The random 1B-shaped model's tokenizer covers its whole vocabulary, so the router streams
    a chunk for the very first token (TTFT is the first token's time, not the first text's)."""
    import random

    from transformers import AutoTokenizer

    from bench.gpu_engine import SHAPE, write_tokenizer
    from engine.detokenizer import IncrementalDetokenizer
    from engine.sampling_params import SamplingParams

    write_tokenizer(tmp_path, SHAPE["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == SHAPE["vocab_size"]
    rng = random.Random(0)
    prompt = [rng.randrange(3, SHAPE["vocab_size"]) for _ in range(50)]
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(max_tokens=8), prompt)
    for token in [3, SHAPE["vocab_size"] - 1, *(rng.randrange(3, 128256) for _ in range(6))]:
        detok.update([token], False)
        assert detok.get_next_output_text(False, True) == f" w{token}"
