"""bench.gpu_engine's lower bound for the 128-request benchmark (the benchmark runs on a GPU)."""

import pytest

from bench.gpu_engine import SHAPE, concurrent_bound


def test_concurrent_bound_counts_prompt_flops_and_decode_bytes():
    shape = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10}  # fmt: skip
    bound = concurrent_bound(shape, requests=3, prompt_tokens=5, new_tokens=4, bandwidth=100.0,
                             flops=1000.0)  # fmt: skip
    # a layer: q 8x8, k and v 8x4 each, o 8x8, gate/up/down 3 x 8x16 = 576 weights
    layer = 64 + 32 + 32 + 64 + 384
    # per prompt: 2 FLOPs per weight per token, one logits row, q.k and p.v over 15 causal pairs
    prompt = 2 * 2 * layer * 5 + 2 * 80 + 4 * 2 * 4 * 2 * 15
    assert bound["prefill_flops"] == 3 * prompt
    # 3 steps after the first token, each reading every weight (bf16) and the KV of 6, 7, 8
    # tokens per request (2 layers x K and V x 4 dims x 2 bytes a token)
    assert bound["decode_bytes"] == 3 * 2 * (2 * layer + 80) + 3 * (6 + 7 + 8) * 32
    assert bound["seconds"] == pytest.approx(
        bound["prefill_flops"] / 1000 + bound["decode_bytes"] / 100
    )


def test_concurrent_bound_of_the_benchmark_shape():
    """The 1B shape's weights are 1.236 B parameters (tied embedding counted once)."""
    bound = concurrent_bound(SHAPE, 1, 1, 2, bandwidth=1.0, flops=1.0)
    weights = 2 * (16 * (2048 * 3072 + 2048 * 2048 + 3 * 2048 * 8192) + 128256 * 2048)
    assert bound["decode_bytes"] == weights + 2 * 16 * 512 * 2 * 2
    assert 2.47e9 < weights < 2.48e9
