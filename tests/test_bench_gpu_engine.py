"""bench.gpu_engine's lower bound for the 128-request benchmark (the benchmark runs on a GPU)."""

import pytest

from bench.gpu_engine import SHAPE, concurrent_bound, concurrent_steps


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


def test_concurrent_steps_of_the_benchmark():
    """65,536 prompt tokens in 9 steps of 8,192 tokens (decodes take their rows of the budget),
    then 127 decode-only steps; the earlier prompts' requests finish first."""
    prompt_steps, decode_steps = concurrent_steps(128, 512, 128, 8192)
    assert prompt_steps[0] == (8192, 16)
    assert all(rows == 8192 for rows, _ in prompt_steps[:-1])
    assert len(prompt_steps) == 9 and prompt_steps[-1] == (569, 128)  # 127 decodes + 442
    assert len(decode_steps) == 127
    assert len(decode_steps[0]) == 128 and len(decode_steps[-1]) < 128
    assert max(decode_steps[-1]) == 512 + 127


def test_concurrent_steps_are_the_engines(tmp_path):
    """The steps the engine runs (tiny model, CPU) for the same shape scaled down: rows and
    sampled rows of each prompt step, the contexts of each decode-only step."""
    from engine import LLM, SamplingParams
    from engine.models.tiny import make_tiny_model

    requests, prompt_tokens, new_tokens, chunk = 12, 8, 6, 32
    llm = LLM(str(make_tiny_model(tmp_path, "llama")), device="cpu", max_num_seqs=requests,
              max_num_batched_tokens=chunk)  # fmt: skip
    runner = llm.engine.core.runner
    seen: list[tuple[int, int, list[int]]] = []

    def record(items):
        rows = sum(it.num_tokens for it in items)
        contexts = [it.start + it.num_tokens for it in items]
        seen.append((rows, sum(it.samples for it in items), contexts))

    run = runner.run
    runner.run = lambda out, *a, **k: (record(out.scheduled), run(out, *a, **k))[1]
    prompts = [[3 + (7 * i + j) % 400 for j in range(prompt_tokens)] for i in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    llm.engine.core.check_integrity(expect_all_free=True)

    prompt_steps, decode_steps = concurrent_steps(requests, prompt_tokens, new_tokens, chunk)
    assert [(rows, sampled) for rows, sampled, _ in seen[: len(prompt_steps)]] == prompt_steps
    assert [sorted(c, reverse=True) for _, _, c in seen[len(prompt_steps) :]] == decode_steps
