"""Automatic prefix caching: hashing, reuse, eviction, collision safety, salts, KV events."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from engine import LLM, SamplingParams
from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, replay
from engine.kv_cache.hashing import ROOT_HASH, hash_block, hash_prompt_blocks, request_extra_keys
from tests.reference import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


# --- hashing ---------------------------------------------------------------------------------


def test_block_hash_is_a_chain_over_full_blocks():
    tokens = list(range(40))
    hashes = hash_prompt_blocks(tokens, 16, ("m",))
    assert len(hashes) == 2  # the 8 trailing tokens are not a full block
    h0 = hash_block(ROOT_HASH, tokens[:16], ("m",))
    assert hashes == [h0, hash_block(h0, tokens[16:32], ("m",))]
    assert hash_prompt_blocks(tokens, 16, ("m",), parent_hash=h0, start_block=1) == hashes[1:]
    assert all(0 <= h < 2**64 for h in hashes)
    assert hash_prompt_blocks(tokens, 16, ("other",))[0] != h0
    assert hash_prompt_blocks(tokens, 16, request_extra_keys("m", "salt"))[0] != h0
    assert hash_prompt_blocks([1] + tokens[1:], 16, ("m",))[1] != hashes[1]  # parent changed


def test_block_hash_agrees_across_processes():
    code = (
        "from engine.kv_cache.hashing import hash_prompt_blocks;"
        "print(hash_prompt_blocks(list(range(64)), 16, ('model', 'salt:x')))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(hash_prompt_blocks(list(range(64)), 16, ("model", "salt:x")))


# --- engine behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "shared"),
    [("llama", 15), ("llama", 16), ("llama", 33), ("mistral", 17), ("mistral", 64)],
)
def test_cache_hits_give_identical_outputs(tiny_model, arch, shared):
    """A shared prefix on and around block boundaries, chunked prefill (8-token budget)."""
    model_dir = tiny_model(arch)
    prefix = _tokens(shared, seed=1)
    prompts = [prefix + _tokens(n, seed=10 + n) for n in (1, 9, 30)]
    llm = LLM(str(model_dir), max_num_batched_tokens=8, block_size=16)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    rest = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected_hit = (shared // 16) * 16
    assert [o.num_cached_tokens for o in rest][1:] == [expected_hit] * 2
    assert rest[0].num_cached_tokens == ((len(prompts[0]) - 1) // 16) * 16
    cold = LLM(str(model_dir), max_num_batched_tokens=8, enable_prefix_caching=False)
    no_cache = cold.generate(prompts, GREEDY, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in rest]
    assert got == [o.outputs[0].token_ids for o in no_cache]
    assert got == [hf_greedy(model_dir, p, 12) for p in prompts]
    llm.check_integrity()
    cold.check_integrity()


def test_last_prompt_token_is_always_computed(tiny_model):
    llm = LLM(str(tiny_model("llama")))
    prompt = _tokens(32, seed=3)  # exactly two full blocks
    llm.generate([prompt], GREEDY, use_tqdm=False)
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 16  # block 2 holds the last token: recomputed
    stats = llm.engine.core.prefix_cache_stats
    assert stats.hits == 16 and stats.queries == 64
    llm.check_integrity()


def test_outputs_identical_after_preemption_with_cache(tiny_model):
    model_dir = tiny_model("qwen3")
    prefix = _tokens(40, seed=4)
    prompts = [prefix + _tokens(5 + i, seed=20 + i) for i in range(6)]
    llm = LLM(str(model_dir), num_kv_blocks=10, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert llm.engine.core.prefix_cache_stats.hits > 0
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model_dir, p, 40) for p in prompts]
    llm.check_integrity()


class _CollidingHashes:
    """Every block of every prompt hashes to the same few values: only token checks save us."""

    def __call__(self, token_ids, block_size, extra_keys, parent, start_block):
        num = len(token_ids) // block_size - start_block
        return [7 + (start_block + i) % 2 for i in range(num)]


def test_hash_collisions_never_give_wrong_output(tiny_model):
    model_dir = tiny_model("llama")
    llm = LLM(str(model_dir), max_num_batched_tokens=16)
    llm.engine.core.kv.hash_fn = _CollidingHashes()
    prompts = [_tokens(40, seed=s) for s in range(3)] + [_tokens(40, seed=0)]
    outs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0, 32]  # only the true repeat hits
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model_dir, p, 12) for p in prompts]
    llm.check_integrity()


def test_salts_isolate_tenants(tiny_model):
    llm = LLM(str(tiny_model("llama")))
    prompt = _tokens(50, seed=5)
    llm.generate([prompt], GREEDY, use_tqdm=False, cache_salt="tenant-a")
    other = llm.generate([prompt], GREEDY, use_tqdm=False, cache_salt="tenant-b")[0]
    unsalted = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    same = llm.generate([prompt], GREEDY, use_tqdm=False, cache_salt="tenant-a")[0]
    assert (other.num_cached_tokens, unsalted.num_cached_tokens) == (0, 0)
    assert same.num_cached_tokens == 48
    assert other.outputs[0].token_ids == same.outputs[0].token_ids
    llm.check_integrity()


def test_prompt_logprobs_bypass_the_cache(tiny_model):
    llm = LLM(str(tiny_model("llama")))
    prompt = _tokens(40, seed=6)
    llm.generate([prompt], GREEDY, use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0 and len(out.prompt_logprobs) == 40
    llm.check_integrity()


def test_reset_prefix_cache(tiny_model):
    llm = LLM(str(tiny_model("llama")))
    prompt = _tokens(40, seed=7)
    llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.engine.add_request("running", prompt, GREEDY)
    llm.engine.step()
    assert llm.reset_prefix_cache() is False  # blocks in use: refused
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert llm.reset_prefix_cache() is True
    assert llm.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 0
    llm.check_integrity()


# --- eviction and events ---------------------------------------------------------------------


def test_eviction_is_lru_and_tail_of_chain_first(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=8, block_size=16)
    kv = llm.engine.core.kv
    a, b = _tokens(50, seed=8), _tokens(50, seed=9)  # 3 full blocks + 1 partial each
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate([a], params, use_tqdm=False)
    llm.generate([b], params, use_tqdm=False)
    hashes_a = hash_prompt_blocks(a, 16, kv.extra_keys(_req(a)))
    hashes_b = hash_prompt_blocks(b, 16, kv.extra_keys(_req(b)))
    assert set(kv.pool.cached) == set(hashes_a + hashes_b)
    # Free queue now: a's partial block, a2, a1, a0, then b's (a was freed first, tail first).
    # A 2-block request takes a's partial block and evicts a2 only: LRU, chain tail first.
    llm.generate([_tokens(20, seed=10)], params, use_tqdm=False)
    assert set(kv.pool.cached) >= set(hashes_b)
    assert hashes_a[0] in kv.pool.cached and hashes_a[1] in kv.pool.cached
    assert hashes_a[2] not in kv.pool.cached
    llm.check_integrity()


def _req(tokens):
    from engine.request import Request

    return Request("x", tokens, GREEDY, max_tokens=1)


def test_pool_evicts_from_the_free_queue_head():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache(block, 100 + i, ROOT_HASH, (i,), ())
    pool.free(reversed(blocks))  # tail first: 102, 101, 100 queue behind the unused block
    assert [b.block_hash for b in pool.free_queue] == [None, 102, 101, 100]
    pool.allocate(2)
    assert set(pool.cached) == {100, 101}
    pool.check_integrity()


def test_event_stream_replays_to_the_cached_set(tiny_model):
    llm = LLM(str(tiny_model("llama")), num_kv_blocks=12, enable_kv_events=True)
    core = llm.engine.core
    events = []
    prefix = _tokens(35, seed=11)
    for i in range(8):  # shared prefixes, distinct tails, evictions (12 blocks only)
        llm.generate([prefix + _tokens(20 + 3 * i, seed=30 + i)], GREEDY, use_tqdm=False)
        events += core.drain_kv_events()
    assert [e.seq for e in events] == list(range(len(events)))
    assert any(isinstance(e, BlockRemoved) for e in events)
    assert replay(events) == set(core.kv.pool.cached)
    stored = [e for e in events if isinstance(e, BlockStored)]
    assert all(e.block_size == 16 and e.token_ids is None for e in stored)
    assert llm.reset_prefix_cache()
    tail = core.drain_kv_events()
    assert isinstance(tail[-1], AllBlocksCleared) and tail[0].seq == len(events)
    assert replay(events + tail) == set() == set(core.kv.pool.cached)
    llm.check_integrity()


def test_events_are_off_by_default(tiny_model):
    llm = LLM(str(tiny_model("llama")))
    llm.generate([_tokens(40, seed=12)], GREEDY, use_tqdm=False)
    assert llm.engine.core.drain_kv_events() == []
