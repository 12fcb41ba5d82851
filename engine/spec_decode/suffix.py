"""Suffix decoding: drafts from suffix trees of the request's tokens and of earlier outputs.

SuffixDecoding (Oliaro et al., 2024, arXiv:2411.04975), as Arctic Inference implements it and vLLM
exposes it (`"method": "suffix"`). Two kinds of tree, each of depth `suffix_decoding_max_tree_depth`
(engine.spec_decode.suffix_index holds one as sorted positions):

    per request   its prompt and output so far, extended by the tokens each step appended,
                  forgotten when it finishes
    global        the outputs of the last `suffix_decoding_max_cached_requests` finished
                  requests (0: none), the oldest dropped first

Each step, for each request about to decode: match the last m tokens (m < depth) in both trees,
walk down the most frequent continuation while its estimated probability stays at or above
`suffix_decoding_min_token_prob`, at most `m * suffix_decoding_max_spec_factor` tokens, and keep
the draft with the highest score (expected accepted tokens) over m and the two trees. No model:
suited to repetitive outputs (agents, code edits, templated answers), across requests too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import SpeculativeConfig
from engine.request import Request
from engine.spec_decode.proposer import Proposer
from engine.spec_decode.suffix_index import SuffixIndex


@dataclass(slots=True)
class _Tracked:
    """A request's own tree: `index` holds its first `num_tokens` tokens."""

    request: Request
    index: SuffixIndex
    num_tokens: int


class SuffixProposer(Proposer):
    """Suffix decoding's drafter; `finished` moves a request's output to the global tree."""

    def __init__(self, config: SpeculativeConfig) -> None:
        super().__init__(config)
        self.max_depth = config.suffix_decoding_max_tree_depth
        self.max_cached = config.suffix_decoding_max_cached_requests
        self.cache = SuffixIndex(self.max_depth)  # the global tree: finished outputs
        self.tracked: dict[str, _Tracked] = {}  # by request id: the requests' own trees

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        factor = self.config.suffix_decoding_max_spec_factor
        min_prob = self.config.suffix_decoding_min_token_prob
        drafts: list[list[int]] = []
        for request, k in zip(requests, max_drafts, strict=True):
            own = self._follow(request)
            if k <= 0:
                drafts.append([])
                continue
            context = own.last_tokens(self.max_depth)
            draft = own.speculate(context, k, factor, min_prob, own=True)
            if self.cache.num_sequences:  # the global tree's, if it scores higher
                cached = self.cache.speculate(context, k, factor, min_prob, beat=draft.score)
                draft = cached if cached.token_ids else draft
            drafts.append(draft.token_ids)
        return drafts

    def finished(self, request: Request) -> None:
        tracked = self.tracked.get(request.request_id)
        if tracked is not None and tracked.request is request:
            del self.tracked[request.request_id]
        output = request.output_token_ids
        if self.max_cached == 0 or len(output) < 2:  # one token: nothing follows a match
            return
        self.cache.add_sequence(output)
        while self.cache.num_sequences > self.max_cached:
            self.cache.drop_oldest()

    def _follow(self, request: Request) -> SuffixIndex:
        """The request's own tree, given the tokens appended since the last step; built anew
        for a request not seen yet, or whose tokens no longer extend those it holds (tokens
        dropped or replaced: a recomputed request whose output was cut back)."""
        tokens = request.all_token_ids
        tracked = self.tracked.get(request.request_id)
        if tracked is not None and tracked.request is request:
            n = tracked.num_tokens
            held = tracked.index.last_tokens(self.max_depth)
            if len(tokens) >= n and tokens[n - len(held) : n] == held.tolist():
                tracked.index.extend(tokens[n:])
                tracked.num_tokens = len(tokens)
                return tracked.index
        index = SuffixIndex(self.max_depth)
        index.add_sequence(tokens)
        self.tracked[request.request_id] = _Tracked(request, index, len(tokens))
        return index
