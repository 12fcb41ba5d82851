"""Suffix decoding (engine.spec_decode.suffix): the suffix index against hand-worked examples and
a brute-force count of occurrences (SuffixDecoding's tree semantics), incremental appends equal to
a rebuild, the global cache's FIFO eviction, a request whose tokens were cut back, the config's
checks; and through the engine, greedy outputs equal to no speculation (with preemption) and a
second batch drafting from the first one's outputs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from common.sampling_params import SamplingParams
from engine import LLM
from engine.config import SpeculativeConfig
from engine.request import Request
from engine.spec_decode.suffix import SuffixProposer
from engine.spec_decode.suffix_index import MAX_COUNTED, SuffixIndex
from tests.test_spec_decode import _prompts

# "1 2 3" is followed by 4 four times, "1 2 3 4" by 5, 6, 7, 5; the end repeats "5 1 2 3"
TOKENS = [1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1, 2, 3, 4, 7, 1, 2, 3, 4, 5, 1, 2, 3]


def _own(tokens, depth=24, k=8, factor=1.0, min_prob=0.1):
    index = SuffixIndex(depth)
    index.add_sequence(tokens)
    return index.speculate(index.last_tokens(depth), k, factor, min_prob, own=True)


def test_counts_probabilities_and_the_best_match():
    """ "1 2 3" occurs 5 times (its own occurrence included): 4 follows with probability 4/5,
    then 5 with 4/5 * 2/4; "5 1 2 3" (matched up to 8 tokens) occurs once before: 1/2 each."""
    draft = _own(TOKENS, k=3)
    assert (draft.token_ids, draft.match_len) == ([4, 5, 1], 3)
    assert draft.score == pytest.approx(0.8 + 0.4 + 0.4)
    # more room: the longer match's draft (what followed "1 2 3 4 5 1 2 3") scores 8 * 0.5
    draft = _own(TOKENS, k=8)
    assert (draft.token_ids, draft.match_len) == ([4, 6, 1, 2, 3, 4, 7, 1], 8)
    assert draft.score == pytest.approx(4.0)


def test_min_token_prob_cuts_the_path():
    assert _own(TOKENS, k=3, min_prob=0.5).token_ids == [4, 6, 1]  # 0.5 each: kept
    draft = _own(TOKENS, k=3, min_prob=0.6)  # 0.8, then 0.4: cut; the 0.5 path: none
    assert (draft.token_ids, draft.score) == ([4], pytest.approx(0.8))
    assert _own(TOKENS, min_prob=0.85).token_ids == []


def test_spec_factor_and_depth_cap_the_draft():
    assert _own(TOKENS, factor=0.5).token_ids == [4, 6, 1, 2]  # 8 matched * 0.5
    assert _own(TOKENS, factor=0.0).token_ids == []
    # depth 10: match + draft <= 10; matching 5 of the 8 tokens leaves room for 5
    draft = _own(TOKENS, depth=10)
    assert (draft.token_ids, draft.match_len) == ([4, 6, 1, 2, 3], 5)


def test_sequences_do_not_run_into_each_other():
    index = SuffixIndex(24)
    index.add_sequence([7, 8, 9, 1, 2])
    index.add_sequence([3, 8, 9, 4, 5])
    assert index.speculate(np.array([3, 8, 9]), 8, 1.0, 0.1).token_ids == [4, 5]  # then its end
    # "8 9" is followed by 1 and 4 once each: the latest occurrence wins the tie, at 1/2
    draft = index.speculate(np.array([6, 8, 9]), 8, 1.0, 0.1)
    assert (draft.token_ids, draft.score) == ([4, 5], pytest.approx(1.0))
    # "2" ends the first sequence: nothing follows it (not the second one's 3)
    assert index.speculate(np.array([9, 1, 2]), 8, 1.0, 0.1).token_ids == []


def _brute_force(seqs, context, k, factor, min_prob, depth, own):
    """SuffixDecoding's draft by counting occurrences in `seqs` directly (own: the context is
    the end of the last one): (tokens, score, match length)."""
    best: tuple[list[int], float, int] = ([], 0.0, 0)
    for m in range(1, min(len(context), depth)):
        occ = [(s, p) for s, seq in enumerate(seqs) for p in range(m - 1, len(seq))
               if seq[p - m + 1 : p + 1] == context[-m:]]  # fmt: skip
        if not occ:
            break
        count = len(occ)
        if own:
            occ.remove((len(seqs) - 1, len(seqs[-1]) - 1))
        tokens, prob, score = [], 1.0, 0.0
        for i in range(1, min(k, int(m * factor + 1e-6), depth - m) + 1):
            after = [(seqs[s][p + i], (s, p)) for s, p in occ if p + i < len(seqs[s])]
            counts = {t: sum(1 for u, _ in after if u == t) for t, _ in after}
            if not counts:
                break
            top = max(counts.values())
            token = max((where, t) for t, where in after if counts[t] == top)[1]  # latest
            prob *= top / count
            if prob < min_prob:
                break
            tokens.append(token)
            score += prob
            occ = [(s, p) for (t, (s, p)) in after if t == token]
            count = top
        if tokens and score >= best[1] - 1e-9:
            best = (tokens, score, m)
    return best


def test_matches_counting_occurrences_directly():
    """Random sequences over small alphabets, appended in pieces, the oldest dropped at times
    (sorted runs, their merges and the buffer's compaction in play; below the sizes where counts
    are sampled): every draft equals the brute force count's."""
    rng = random.Random(0)
    for _ in range(40):
        depth, vocab = rng.choice([4, 8, 24]), rng.choice([2, 3, 6])
        index, live = SuffixIndex(depth), []
        for _ in range(rng.randrange(1, 16)):
            if live and (rng.random() < 0.25 or sum(map(len, live)) > 400):
                index.drop_oldest()
                live.pop(0)
            else:
                seq = [rng.randrange(vocab) for _ in range(rng.randrange(1, 100))]
                index.add_sequence(seq[:3])
                index.extend(seq[3:])
                live.append(seq)
            if not live:
                continue
            assert index.num_tokens == sum(map(len, live))
            own = rng.random() < 0.5
            context = live[-1][-depth:] if own else [rng.randrange(vocab) for _ in range(6)]
            k, factor, min_prob = rng.choice([3, 30]), rng.choice([1.0, 2.0]), rng.choice([0, 0.3])
            draft = index.speculate(np.array(context), k, factor, min_prob, own=own)
            expected = _brute_force(live, context, k, factor, min_prob, depth, own)
            assert (draft.token_ids, draft.match_len) == (expected[0], expected[2])
            assert draft.score == pytest.approx(expected[1])


def test_frequent_matches_are_counted_on_a_sample():
    """Over MAX_COUNTED occurrences, a continuation's probability is estimated on a sample."""
    index = SuffixIndex(24)
    for i in range(3 * MAX_COUNTED):
        index.add_sequence([7, 9] if i % 6 == 0 else [7, 8])  # 8 follows 7 five times in six
    draft = index.speculate(np.array([5, 7]), 8, 1.0, 0.1)
    assert draft.token_ids == [8] and draft.score == pytest.approx(5 / 6, abs=0.02)
    assert index.speculate(np.array([5, 7]), 8, 1.0, 0.9).token_ids == []


def test_appending_equals_rebuilding():
    rng = random.Random(1)
    tokens = [rng.randrange(5) for _ in range(40)]
    index = SuffixIndex(24)
    index.add_sequence(tokens)
    for _ in range(120):
        new = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        tokens += new
        index.extend(new)
        assert index.last_tokens(24).tolist() == tokens[-24:]
        fresh = SuffixIndex(24)
        fresh.add_sequence(tokens)
        context = np.array(tokens[-24:])
        assert index.speculate(context, 8, 1.0, 0.1, own=True) == fresh.speculate(
            context, 8, 1.0, 0.1, own=True
        )


def _request(rid: str, prompt: list[int], output: list[int]) -> Request:
    request = Request(rid, prompt, SamplingParams(temperature=0), max_tokens=64)
    for token in output:
        request.append_output_token(token)
    return request


def _suffix(**options) -> SuffixProposer:
    return SuffixProposer(SpeculativeConfig(method="suffix", num_speculative_tokens=8, **options))


def test_the_global_cache_keeps_the_newest_outputs():
    proposer = _suffix(suffix_decoding_max_cached_requests=2)
    for i in (1, 2, 3):  # outputs "i01 i02 i03 i04": the first is evicted
        proposer.finished(_request(f"done{i}", [5], [100 * i + j for j in (1, 2, 3, 4)]))
    assert proposer.cache.num_sequences == 2
    asking = [_request(f"new{i}", [5, 6], [100 * i + 1, 100 * i + 2]) for i in (1, 2, 3)]
    assert proposer.propose(asking, [8, 8, 8]) == [[], [203, 204], [303, 304]]
    assert set(proposer.tracked) == {"new1", "new2", "new3"}
    for request in asking:
        proposer.finished(request)
    assert not proposer.tracked and proposer.cache.num_sequences == 2
    assert proposer.propose([_request("again", [7], [201, 202])], [8]) == [[]]  # new3 pushed it
    off = _suffix(suffix_decoding_max_cached_requests=0)
    off.finished(_request("done", [5], [101, 102, 103, 104]))
    assert off.cache.num_sequences == 0
    assert off.propose([_request("new", [5, 6], [101, 102])], [8]) == [[]]


def test_a_request_whose_tokens_were_cut_back_is_followed_anew():
    """A request's tree follows `all_token_ids` incrementally; tokens dropped or replaced (a
    recompute that rolled the output back) rebuild it: its drafts are a fresh tree's."""
    proposer = _suffix()
    request = _request("r", [1, 2, 3, 4, 1, 2, 3, 9, 1, 2], [3])
    assert proposer.propose([request], [8]) == [[9, 1, 2]]  # 4 or 9 after "1 2 3": the latest
    index = proposer.tracked["r"].index
    request.append_output_token(9)
    assert proposer.propose([request], [8]) == [[1, 2, 3, 9]]  # what followed "1 2 3 9"
    assert proposer.tracked["r"].index is index  # extended, not rebuilt
    del request.output_token_ids[-2:], request.all_token_ids[-2:]
    request.append_output_token(4)
    request.append_output_token(4)  # as many tokens as before, not the same
    assert proposer.propose([request], [8]) == _suffix().propose([request], [8]) == [[4]]
    assert proposer.tracked["r"].index is not index
    assert proposer.tracked["r"].index.num_tokens == len(request.all_token_ids)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"suffix_decoding_max_tree_depth": 0}, r"speculative_config\.suffix_decoding_max_tree"),
        ({"suffix_decoding_max_cached_requests": -1}, "suffix_decoding_max_cached_requests"),
        ({"suffix_decoding_max_spec_factor": -0.5}, "suffix_decoding_max_spec_factor"),
        ({"suffix_decoding_min_token_prob": 1.5}, "suffix_decoding_min_token_prob"),
        ({"suffix_decoding_min_token_prob": "high"}, "suffix_decoding_min_token_prob"),
    ],
)
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict({"method": "suffix", **options})


def test_vllm_defaults():
    config = SpeculativeConfig.from_dict({"method": "suffix"})
    assert config.num_speculative_tokens == 24  # vLLM's: up to the tree depth
    assert (config.suffix_decoding_max_cached_requests, config.suffix_decoding_max_spec_factor,
            config.suffix_decoding_min_token_prob) == (10000, 1.0, 0.1)  # fmt: skip
    config = SpeculativeConfig.from_dict({"method": "suffix", "suffix_decoding_max_tree_depth": 9})
    assert config.num_speculative_tokens == 9
    assert SpeculativeConfig.from_dict({"method": "suffix", "num_speculative_tokens": 4})\
        .num_speculative_tokens == 4  # fmt: skip


def _accepted(llm: LLM, prompts, params) -> tuple[list[list[int]], int]:
    stats = llm.engine.core.scheduler.spec_stats
    before = stats.num_accepted_tokens
    outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return outs, stats.num_accepted_tokens - before


def test_greedy_equals_no_speculation(tiny_model):
    """Small blocks and cache (preemption: the requests' trees follow recomputed requests), a
    low token budget (chunked prompts): the tokens of the engine without drafts, some accepted;
    every request's tree dropped at the end, every block back."""
    model = str(tiny_model("llama"))
    prompts = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kw = {"num_kv_blocks": 20, "block_size": 4, "max_num_batched_tokens": 32}
    expected, _ = _accepted(LLM(model, **kw), prompts, params)
    llm = LLM(model, speculative_config={"method": "suffix", "num_speculative_tokens": 6}, **kw)
    outputs, accepted = _accepted(llm, prompts, params)
    assert outputs == expected and accepted > 0
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    assert isinstance(core.proposer, SuffixProposer) and not core.proposer.tracked
    llm.check_integrity()


def test_a_second_batch_drafts_from_the_first(tiny_model):
    """The same prompts again accept more drafts: the first batch's outputs are in the global
    tree. With the global tree off, the second batch accepts exactly as many as the first."""
    model = str(tiny_model("llama"))
    prompts = _prompts(8, seed=1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    spec = {"method": "suffix", "num_speculative_tokens": 6}
    accepted = {}
    for cached in (10000, 0):
        config = {**spec, "suffix_decoding_max_cached_requests": cached}
        llm = LLM(model, num_kv_blocks=256, speculative_config=config)
        first, accepted_first = _accepted(llm, prompts, params)
        second, accepted_second = _accepted(llm, prompts, params)
        assert first == second
        accepted[cached] = (accepted_first, accepted_second)
        proposer = llm.engine.core.proposer
        assert isinstance(proposer, SuffixProposer)
        assert proposer.cache.num_sequences == (2 * len(prompts) if cached else 0)
        llm.check_integrity()
    assert accepted[0][0] == accepted[0][1] > 0  # the requests' own trees: the same drafts
    # (the first batch may already draft from requests of it that finished early)
    assert accepted[10000][1] > max(accepted[10000][0], accepted[0][1])
