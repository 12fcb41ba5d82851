"""Draft-model speculative decoding (engine.spec_decode.draft_model) on random-weight tiny models.

Greedy outputs equal those without drafts on every architecture, with preemption, prefix hits
and chunked prompts in the runs. The drafter is the target's weights plus noise (it agrees
often, not always: accepted runs of every length, so the draft cache keeps, drops and refeeds
positions), the target itself (every draft must be accepted: the draft cache's bookkeeping is
exact), or another architecture. Every block of both caches goes back; bad drafters are refused
naming `speculative_config.model`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.sampling_params import SamplingParams
from engine import LLM
from engine.spec_decode.draft_model import DraftModelProposer, DraftState
from tests.test_spec_decode import _prompts, _run

SMALL_CACHE = {"num_kv_blocks": 36, "block_size": 4, "max_num_batched_tokens": 24}


def noisy_copy(model: Path, dest: Path, std: float = 0.03, seed: int = 1) -> Path:
    """`model` with each weight tensor moved by `std` of its own spread, as a new directory."""
    shutil.copytree(model, dest)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(model / "model.safetensors")
    for name, w in weights.items():
        weights[name] = w + std * w.std() * torch.randn(w.shape, generator=gen)
    save_file(weights, str(dest / "model.safetensors"), {"format": "pt"})
    return dest


def _spec(drafter: Path | str, k: int = 4) -> dict:
    return {"method": "draft_model", "model": str(drafter), "num_speculative_tokens": k}


def _check_freed(llm: LLM) -> None:
    proposer = llm.engine.core.proposer
    assert isinstance(proposer, DraftModelProposer)
    assert proposer.states == {} and proposer.cache.blocks == {}
    assert proposer.cache.num_free == proposer.cache.num_blocks
    llm.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_equals_no_speculation(tiny_model, tmp_path, arch):
    """Small blocks and cache (preemption), a low token budget (chunked prompts), the prompts
    twice (prefix hits): the tokens of a run without drafts, drafts both accepted and not."""
    model = tiny_model(arch)
    prompts = _prompts(8)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = _run(LLM(str(model), **SMALL_CACHE), prompts, params)
    drafter = noisy_copy(model, tmp_path / "drafter")
    llm = LLM(str(model), speculative_config=_spec(drafter), **SMALL_CACHE)
    assert _run(llm, prompts, params) == expected
    assert _run(llm, prompts, params) == expected
    core = llm.engine.core
    stats = core.scheduler.spec_stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert core.scheduler.num_preemptions > 0 and core.prefix_cache_stats.hits > 0
    _check_freed(llm)


def test_the_target_as_drafter_is_always_accepted(tiny_model):
    """Drafting with the target's own weights, every draft is accepted: each step the draft
    cache held exactly the request's verified tokens (a stale or missing position would
    change a draft). With preemption and prefix hits."""
    model = str(tiny_model("llama"))
    prompts = _prompts(6, seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = _run(LLM(model, **SMALL_CACHE), prompts, params)
    llm = LLM(model, speculative_config=_spec(model, k=3), **SMALL_CACHE)
    assert _run(llm, prompts, params) == expected
    assert _run(llm, prompts, params) == expected
    core = llm.engine.core
    stats = core.scheduler.spec_stats
    assert stats.num_draft_tokens > 100
    assert stats.num_accepted_tokens == stats.num_draft_tokens
    assert core.scheduler.num_preemptions > 0 and core.prefix_cache_stats.hits > 0
    _check_freed(llm)


def test_a_drafter_of_another_architecture(tiny_model):
    """A Llama drafter for a Qwen3 target (other head_dim, no q/k norms, untied head): the
    vocabulary is all they share. Sampled requests beside greedy ones, stops and max_tokens."""
    model = str(tiny_model("qwen3"))
    prompts = _prompts(4, seed=5)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(model, speculative_config=_spec(tiny_model("llama", seed=1), k=2))
    assert _run(llm, prompts, greedy) == _run(LLM(model), prompts, greedy)
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
    assert all(len(t) == 16 for t in _run(llm, prompts, sampled))
    assert llm.engine.core.scheduler.spec_stats.num_drafts > 0
    _check_freed(llm)


def test_a_full_draft_cache_evicts_requests_not_drafting(tiny_model):
    """With fewer draft blocks than requests need, requests not asked this step give theirs
    up and later refeed their tokens; outputs stay exact."""
    model = str(tiny_model("mistral"))
    prompts = _prompts(6, seed=4)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = {**SMALL_CACHE, "num_kv_blocks": 30}
    expected = _run(LLM(model, **kw), prompts, params)
    llm = LLM(model, speculative_config=_spec(model, k=2), **kw)
    proposer = llm.engine.core.proposer
    assert isinstance(proposer, DraftModelProposer)
    assert _run(llm, prompts, params) == expected
    assert proposer.num_evicted > 0
    _check_freed(llm)


def test_draft_state_counts_the_accepted_drafts():
    state = DraftState(num_verified=5, drafts=[7, 8, 9])
    assert state.num_valid([0, 1, 2, 3, 4, 7, 8, 1]) == 7  # two accepted, then the bonus
    assert state.num_valid([0, 1, 2, 3, 4, 6]) == 5  # none accepted
    assert state.num_valid([0, 1, 2, 3, 4, 7, 8, 9, 3]) == 8  # all the cache holds
    assert state.num_valid([0, 1, 2, 3, 4]) == 4  # nothing new: the last token is fed again
    assert DraftState().num_valid([4, 5, 6]) == 0  # first call: the whole sequence


def _edited(model: Path, dest: Path, **changes: object) -> Path:
    shutil.copytree(model, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_bad_drafters_are_refused_by_field(tiny_model, tmp_path):
    model = tiny_model("llama")
    cases = [
        (_edited(model, tmp_path / "vocab", vocab_size=600), "vocab_size 600, but the target's"),
        (_edited(model, tmp_path / "short", max_position_embeddings=64), "max_model_len 64, small"),
        (tmp_path / "missing", "does not exist"),
        (_edited(model, tmp_path / "arch", architectures=["GPT2LMHeadModel"]), "unsupported"),
    ]
    for drafter, message in cases:
        with pytest.raises(ValueError, match=f"speculative_config.model: .*{message}"):
            LLM(str(model), speculative_config=_spec(drafter))
    # the target's own context may be lowered to the drafter's
    LLM(str(model), max_model_len=64, speculative_config=_spec(tmp_path / "short"))
