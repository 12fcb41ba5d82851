"""The engine against transformers: greedy tokens and logprobs, batched, chunked, preempted."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.reference import hf_greedy, hf_logprobs

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
MAX_NEW = 24
# 9 prompts of different lengths; 150 > max_num_batched_tokens (64) so it is chunked, and
# several exceed mistral's 48-token sliding window.
PROMPT_LENS = [1, 5, 16, 17, 33, 49, 64, 100, 150]


def _prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


_reference: dict[str, list[list[int]]] = {}


def _expected(arch: str, model_dir, prompts) -> list[list[int]]:
    if arch not in _reference:
        _reference[arch] = [hf_greedy(model_dir, p, MAX_NEW) for p in prompts]
    return _reference[arch]


def _greedy_run(model_dir, prompts, **engine_args) -> tuple[LLM, list[list[int]]]:
    llm = LLM(str(model_dir), max_num_batched_tokens=64, max_num_seqs=16, **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_transformers(tiny_model, arch):
    model_dir = tiny_model(arch)
    llm, got = _greedy_run(model_dir, prompts := _prompts(llm_vocab(model_dir)))
    assert got == _expected(arch, model_dir, prompts)
    llm.check_integrity()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_preemption_matches_transformers(tiny_model, arch):
    model_dir = tiny_model(arch)
    prompts = _prompts(llm_vocab(model_dir))
    # 12 blocks of 16 tokens hold the longest request (150 + 24 tokens) but not the batch.
    llm, got = _greedy_run(model_dir, prompts, num_kv_blocks=12)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert got == _expected(arch, model_dir, prompts)
    llm.check_integrity()


def test_logprobs_match_transformers(tiny_model):
    model_dir = tiny_model("llama")
    prompt = _prompts(llm_vocab(model_dir))[5]
    llm = LLM(str(model_dir), max_num_batched_tokens=16)  # prompt logprobs across chunks
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=3)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    ref = hf_logprobs(model_dir, prompt + completion.token_ids)  # (L, V)
    for i, (token, entry) in enumerate(
        zip(completion.token_ids, completion.logprobs, strict=False)
    ):
        row = ref[len(prompt) - 1 + i]
        assert abs(entry[token].logprob - row[token].item()) < 1e-4
        assert entry[token].rank == 1  # greedy picks the most likely token
        top = row.topk(5)
        assert set(entry) == set(top.indices.tolist())
        for tok, value in zip(top.indices.tolist(), top.values.tolist(), strict=False):
            assert abs(entry[tok].logprob - value) < 1e-4
    expected_cum = sum(
        ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion.token_ids)
    )
    assert completion.cumulative_logprob == pytest.approx(expected_cum, abs=1e-3)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        target = prompt[p]
        assert abs(entry[target].logprob - ref[p - 1, target].item()) < 1e-4
        assert entry[target].rank == int((ref[p - 1] >= ref[p - 1, target]).sum())
        assert len(entry) in (3, 4)  # top 3 plus the target when it is not among them
    llm.check_integrity()


def llm_vocab(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_bf16_runs_and_mostly_agrees(tiny_model):
    """bfloat16 weights and cache: a smoke check that the dtype path runs end to end."""
    model_dir = tiny_model("qwen3")
    llm = LLM(str(model_dir), dtype="bfloat16")
    assert llm.engine.core.runner.kv_caches[0].dtype == torch.bfloat16
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
    llm.check_integrity()
