"""SuffixDecoding's suffix tree, as the sorted positions of its token sequences.

SuffixDecoding (Oliaro et al., 2024, arXiv:2411.04975; Arctic Inference's `SuffixTree`) keeps a
suffix tree of depth D whose node for a string s counts the occurrences of s. Drafting matches the
last m tokens of the request (m = 1 .. D - 1) and walks down from that node, taking the most
frequent child each time, with the probability estimated as count(child) / count(node). The same
counts come from the positions where the strings end:

    tokens      ... a b c x ... a b c x ... a b c y ... a b c        context ends in "a b c"
    S_3       = {p : tokens[p-2 .. p] = a b c}                        count(abc) = |S_3|
    count(abcx) = |{p in S_3 : tokens[p + 1] = x}|, and so on down the path

So this keeps every position, sorted by a packed key of the three tokens that end there: the
occurrences of a context's last 1, 2 or 3 tokens are a range found by binary search; longer matches
are measured on those by comparing the tokens before them. No node is built: memory is two int64
per token. New positions wait in a short unsorted tail, then join sorted runs, merged as in a
log-structured merge tree (each run at least 4x the next: O(log n) runs, O(log n) amortized work
per token). Sequences are dropped oldest first; their positions are skipped, and compacted away
once they are half of the buffer.

The work per draft is bounded, not the counts: a match occurring more than MAX_COUNTED times has
its continuation's frequencies counted on an evenly spaced sample of its occurrences, and longer
matches are looked for among the latest MAX_NARROWED occurrences of the context's last 3 tokens.
Below those sizes (a request's own tokens; a cache of moderate size) every count is exact.

Layout: every sequence starts with a BOUNDARY, so that no match crosses sequences and every
continuation stops at the end of its own:

    [-1 -1 | -1 a a a | -1 b b | -1 c c c c | -1 -1 ...]
     padding  sequence 0  seq 1   seq 2 (newest)  free (always BOUNDARY)
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

BOUNDARY = -1
MAX_COUNTED = 1024
MAX_NARROWED = 4096
_PAD = 2  # boundaries before the first sequence: every position's key reads two tokens back
_FIELD = 21  # bits per token in a key; ids of 2**21 - 1 and over collide (no vocabulary has them)
_MASK = (1 << _FIELD) - 1
_LAST_KEY = (1 << (3 * _FIELD)) - 1
_NONE = np.empty(0, dtype=np.int64)
_TAIL = 32  # positions appended since the last run was sorted (scanned by every draft)
_SMALL = 48  # occurrences walked in Python: below this numpy's cost per call dominates


class Draft(NamedTuple):
    """Drafted tokens, `score` (the sum of their estimated probabilities: the expected number
    accepted) and `match_len`, the context tokens matched to draft them."""

    token_ids: list[int]
    score: float
    match_len: int


NO_DRAFT = Draft([], 0.0, 0)


class _Run(NamedTuple):
    keys: np.ndarray  # sorted
    ends: np.ndarray  # the positions, by key then position


class SuffixIndex:
    """Token sequences (appended to the newest, dropped oldest first) and the drafts they
    suggest for a context (`speculate`)."""

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth  # tokens: match plus draft, as the tree's depth
        self._tokens = np.full(256, BOUNDARY, dtype=np.int32)
        self._size = _PAD
        self._starts: deque[int] = deque()  # each sequence's boundary position, oldest first
        self._base = _PAD  # positions below belong to dropped sequences
        self._runs: list[_Run] = []  # oldest first; they cover the positions below _indexed
        self._indexed = _PAD
        self._tail: list[int] = []  # keys of the positions from _indexed on, unsorted

    @property
    def num_sequences(self) -> int:
        return len(self._starts)

    @property
    def num_tokens(self) -> int:
        """Tokens held in the sequences not dropped (boundaries not counted)."""
        return self._size - self._base - len(self._starts)

    def last_tokens(self, n: int) -> np.ndarray:
        """The newest sequence's last `n` tokens (fewer if it is shorter): a view."""
        assert self._starts, "no sequence"
        return self._tokens[max(self._starts[-1] + 1, self._size - n) : self._size]

    def add_sequence(self, token_ids: Sequence[int] = ()) -> None:
        """Start a new sequence (appends go to it from now on) holding `token_ids`."""
        self._starts.append(self._size)
        self._append(np.array([BOUNDARY, *token_ids], dtype=np.int32))

    def extend(self, token_ids: Sequence[int]) -> None:
        """Append tokens to the newest sequence."""
        assert self._starts, "add_sequence first"
        if len(token_ids):
            self._append(np.asarray(token_ids, dtype=np.int32))

    def drop_oldest(self) -> None:
        """Forget the oldest sequence."""
        self._starts.popleft()
        self._base = self._starts[0] if self._starts else self._size
        if self._base - _PAD > self._size - self._base:
            self._compact()

    def speculate(
        self,
        context: np.ndarray,
        max_tokens: int,
        max_spec_factor: float,
        min_token_prob: float,
        own: bool = False,
        beat: float = 0.0,
    ) -> Draft:
        """The best-scoring draft over the match lengths m = 1 .. len(context) - 1 (ties: the
        longer match), each at most min(max_tokens, floor(m * max_spec_factor), max_depth - m)
        tokens, stopping where the path's probability falls below `min_token_prob`; NO_DRAFT
        unless one scores above `beat`. `own`: the context is this index's newest tokens, an
        occurrence counted but not drafted from (nothing follows it yet), as in a request's
        own tree."""
        own_end = self._size - 1 if own else -1
        best, best_score = NO_DRAFT, beat
        for lo, hi, ends in reversed(self._match_groups(context, own_end)):  # longest first
            lengths = range(hi, lo - 1, -1)
            caps = [min(max_tokens, int(m * max_spec_factor + 1e-6), self.max_depth - m)
                    for m in lengths]  # fmt: skip
            if max(caps) <= best_score:  # not even with probability 1 throughout
                continue
            if isinstance(ends, list):  # a short match's occurrences, gathered only now
                ends = self._collect(ends, own_end, latest=False)[0]
            path = self._continuation(ends, max(caps), min_token_prob, int(own), best_score)
            scores = list(itertools.accumulate(path.probs))
            for m, cap in zip(lengths, caps, strict=True):
                n = min(cap, len(path.tokens))
                if n > 0 and scores[n - 1] > best_score + 1e-9:  # a tie keeps the longer match
                    best, best_score = Draft(path.tokens[:n], scores[n - 1], m), scores[n - 1]
        return best

    def _match_groups(
        self, context: np.ndarray, own_end: int
    ) -> list[tuple[int, int, np.ndarray | list[np.ndarray]]]:
        """(m_lo, m_hi, ends): where the context's last m tokens end, for m = 1 .. len(context)
        - 1 while any occurs, in groups over which longer matches lose no occurrence, `own_end`
        (the context's own occurrence) left out. For m_hi < 3, `ends` is still in parts (see
        `_collect`); their counts include dropped positions, which can only split a group."""
        longest = min(len(context), self.max_depth) - 1
        if longest < 1:
            return []
        found = self._occurrences(context, min(3, longest))
        sizes = [sum(map(len, parts)) - (own_end >= 0) for parts in found[:2]]
        if longest >= 3:
            three, size = self._collect(found[2], own_end, latest=True)
            sizes.append(size)
        if longest > 3:
            lengths = self._match_lengths(three, context, longest)
            by_length = np.bincount(lengths, minlength=longest + 1)[4:]
            sizes += np.cumsum(by_length[::-1])[::-1].tolist()  # |S_m|: matched m or more
        groups: list[tuple[int, int, np.ndarray | list[np.ndarray]]] = []
        lo = 1
        for m in range(1, longest + 1):
            if m == longest or sizes[m] < sizes[m - 1]:  # sizes[m]: of m + 1 tokens
                if sizes[lo - 1] > 0:  # (a group reaching 3 tokens is a subset of S_3's)
                    ends = found[lo - 1] if m < 3 else three if lo <= 3 else three[lengths >= lo]
                    groups.append((lo, m, ends))
                if m == longest or sizes[m] == 0:
                    break
                lo = m + 1
        return groups

    def _occurrences(self, context: np.ndarray, most: int) -> list[list[np.ndarray]]:
        """For m = 1 .. `most` (<= 3), the positions where the context's last m tokens end, in
        parts (a view per sorted run, then the tail; dropped ones included)."""
        bounds = [bound for m in range(1, most + 1) for bound in _key_range(context, m)]
        found: list[list[np.ndarray]] = [[] for _ in range(most)]
        for run in self._runs:
            at = run.keys.searchsorted(bounds).tolist()
            for m in range(most):
                if at[2 * m + 1] > at[2 * m]:
                    found[m].append(run.ends[at[2 * m] : at[2 * m + 1]])
        for m in range(most):  # the tail: a few keys, scanned in Python
            low, high = bounds[2 * m], bounds[2 * m + 1]
            hits = [at for at, key in enumerate(self._tail, self._indexed) if low <= key < high]
            if hits:
                found[m].append(np.array(hits))
        return found

    def _collect(
        self, parts: list[np.ndarray], own_end: int, latest: bool
    ) -> tuple[np.ndarray, int]:
        """The live positions in `parts` but `own_end`, and how many there are. Past the limit
        (MAX_NARROWED if `latest`, else MAX_COUNTED), a sample: the latest ones (`latest`: each
        part is in position order, the parts from oldest to newest), else evenly spaced ones;
        the count is then the parts' (dropped positions included)."""
        total = sum(len(part) for part in parts)
        limit = MAX_NARROWED if latest else MAX_COUNTED
        if total > limit and latest:
            sample: list[np.ndarray] = []
            left = limit
            for part in reversed(parts):
                sample.insert(0, part[-left:])
                left -= len(sample[0])
                if left <= 0:
                    break
            parts = sample
        elif total > limit:
            stride = -(-total // limit)
            parts = [part[::stride] for part in parts]
        if len(parts) != 1:
            parts = [np.concatenate([_NONE, *parts])]
        ends = parts[0]
        if self._base > _PAD:  # some sequences were dropped
            ends = ends[ends >= self._base]
        if own_end >= 0:
            ends = ends[ends != own_end]
        return ends, (len(ends) if total <= limit else total - (own_end >= 0))

    def _match_lengths(self, ends: np.ndarray, context: np.ndarray, longest: int) -> np.ndarray:
        """How many of the context's last tokens (3 .. `longest`) end at each of `ends`, where
        its last 3 do: one token further back at a time while many match, then the rest of
        the window at once."""
        lengths = np.full(len(ends), 3)
        alive = np.arange(len(ends))
        back = 3
        while back < longest and len(alive) > 8 * _SMALL:
            alive = alive[self._tokens[ends[alive] - back] == context[-1 - back]]
            lengths[alive] += 1
            back += 1
        if back < longest and len(alive):
            offsets = np.arange(back, longest)
            window = self._tokens[np.maximum(ends[alive, None] - offsets, 0)]
            same = window == context[::-1][back:longest]
            lengths[alive] += np.where(same.all(axis=1), longest - back, same.argmin(axis=1))
        return lengths

    def _continuation(
        self, ends: np.ndarray, limit: int, min_token_prob: float, extra: int, beat: float
    ) -> _Path:
        """The greedy path below the occurrences `ends` (and `extra` more that have nothing
        after them): up to `limit` tokens, each the most frequent next one among the
        occurrences still on the path (ties: the latest), with the path's probability. Cut
        short where its score can no longer exceed `beat`."""
        rows = self._tokens[ends[:, None] + np.arange(1, limit + 1)]  # (n, limit): what follows
        path = _Path([], [], len(ends) + extra)
        for i in range(limit):
            if len(ends) <= _SMALL:
                return _walk(rows[:, i:].tolist(), ends.tolist(), min_token_prob, beat, path)
            if path.bound(limit - i) <= beat:
                break
            after = rows[:, i]
            token, num = _most_frequent(after, ends)
            if num == 0 or not path.take(token, num, min_token_prob):
                break
            keep = after == token
            rows, ends = rows[keep], ends[keep]
        return path

    def _append(self, tokens: np.ndarray) -> None:
        n = len(tokens)
        start = self._size
        self._reserve(start + n)
        self._tokens[start : start + n] = tokens
        self._size = start + n
        if self._size - self._indexed >= _TAIL:
            self._sort_tail()
        else:  # keys of the new positions, from the tokens that end there
            t = self._tokens[start - 2 : start + n].tolist()
            self._tail += [_key(*t[i : i + 3]) for i in range(n)]

    def _reserve(self, size: int) -> None:
        """Room for `size` tokens, and past them the BOUNDARY a continuation stops at."""
        need = size + self.max_depth + 1
        if need > len(self._tokens):
            grown = np.full(2 * need, BOUNDARY, dtype=np.int32)
            grown[: self._size] = self._tokens[: self._size]
            self._tokens = grown

    def _keys_of(self, ends: np.ndarray) -> np.ndarray:
        """Each position's key: its token and the two before, each + 1 (a boundary is 0)."""
        t = self._tokens
        return (
            ((t[ends].astype(np.int64) + 1) & _MASK) << (2 * _FIELD)
            | ((t[ends - 1].astype(np.int64) + 1) & _MASK) << _FIELD
            | ((t[ends - 2].astype(np.int64) + 1) & _MASK)
        )

    def _sort_tail(self) -> None:
        """The tail becomes a run; runs not 4x larger than the next one merge into it."""
        ends = np.arange(self._indexed, self._size, dtype=np.int64)
        keep = (self._tokens[self._indexed : self._size] != BOUNDARY) & (ends >= self._base)
        ends = ends[keep]
        keys = self._keys_of(ends)
        self._indexed, self._tail = self._size, []
        if not len(keys):
            return
        order = np.argsort(keys, kind="stable")
        runs = self._runs
        runs.append(_Run(keys[order], ends[order]))
        while len(runs) > 1 and len(runs[-2].keys) < 4 * len(runs[-1].keys):
            newer, older = runs.pop(), runs.pop()
            keys = np.concatenate((older.keys, newer.keys))
            ends = np.concatenate((older.ends, newer.ends))
            order = np.argsort(keys, kind="stable")  # two sorted runs: a merge
            runs.append(_Run(keys[order], ends[order]))

    def _compact(self) -> None:
        """Move the live sequences to the front; drop the dropped ones' positions."""
        shift = self._base - _PAD
        live = self._tokens[self._base : self._size]
        self._tokens = np.full(2 * (_PAD + len(live) + self.max_depth + 1), BOUNDARY, np.int32)
        self._tokens[_PAD : _PAD + len(live)] = live
        self._tail = self._tail[max(self._base - self._indexed, 0) :]
        runs = []
        for run in self._runs:
            keep = run.ends >= self._base
            if keep.any():
                runs.append(_Run(run.keys[keep], run.ends[keep] - shift))
        self._runs = runs
        self._starts = deque(start - shift for start in self._starts)
        self._size -= shift
        self._indexed = max(self._indexed - shift, _PAD)
        self._base = _PAD


def _key(before2: int, before: int, token: int) -> int:
    """The key of a position: its token and the two before, each + 1 (a boundary is 0)."""
    return ((token + 1) & _MASK) << (2 * _FIELD) | ((before + 1) & _MASK) << _FIELD | (
        (before2 + 1) & _MASK
    )


def _key_range(context: np.ndarray, m: int) -> tuple[int, int]:
    """The keys [low, high) of the positions where the context's last m (1 to 3) tokens end."""
    key = 0
    for j in range(m):
        key |= ((int(context[-1 - j]) + 1) & _MASK) << (_FIELD * (2 - j))
    return key, min(key + (1 << (_FIELD * (3 - m))), _LAST_KEY)


class _Path:
    """A path being walked down: its tokens, their probabilities, the current node's count."""

    __slots__ = ("count", "probs", "tokens")

    def __init__(self, tokens: list[int], probs: list[float], count: int) -> None:
        self.tokens, self.probs, self.count = tokens, probs, count

    def bound(self, more: int) -> float:
        """The highest score reachable with `more` tokens to go."""
        prob = self.probs[-1] if self.probs else 1.0
        return sum(self.probs) + prob * more

    def take(self, token: int, count: int, min_token_prob: float) -> bool:
        """Go down to the child `token` (seen `count` times), unless its probability is below
        `min_token_prob`."""
        prob = (self.probs[-1] if self.probs else 1.0) * (count / self.count)
        if prob < min_token_prob:
            return False
        self.tokens.append(token)
        self.probs.append(prob)
        self.count = count
        return True


def _walk(rows: list[list[int]], ends: list[int], min_token_prob: float, beat: float,
          path: _Path) -> _Path:  # fmt: skip
    """`_continuation` over few occurrences, in Python: `rows[r]` follows `ends[r]`."""
    for i in range(len(rows[0]) if rows else 0):
        if path.bound(len(rows[0]) - i) <= beat:
            break
        column = [row[i] for row in rows]
        if len(rows) == 1:  # one occurrence left: the rest of it, at one probability
            rest = column + rows[0][i + 1 :]
            rest = rest[: rest.index(BOUNDARY)] if BOUNDARY in rest else rest
            for token in rest:
                if not path.take(token, 1, min_token_prob):
                    break
            break
        if column[0] != BOUNDARY and column.count(column[0]) == len(column):  # all agree
            if not path.take(column[0], len(column), min_token_prob):
                break
            continue
        tally = Counter(column)
        tally.pop(BOUNDARY, None)
        if not tally:
            break
        top = max(tally.values())
        tied = [token for token, n in tally.items() if n == top]
        token = tied[0] if len(tied) == 1 else max(
            (end, t) for end, t in zip(ends, column, strict=True) if t in tied
        )[1]  # fmt: skip
        if not path.take(token, top, min_token_prob):
            break
        kept = [r for r, t in enumerate(column) if t == token]
        rows, ends = [rows[r] for r in kept], [ends[r] for r in kept]
    return path


def _most_frequent(after: np.ndarray, ends: np.ndarray) -> tuple[int, int]:
    """The most frequent token in `after` (BOUNDARY aside; ties: the one whose occurrence,
    `ends`, is the latest) and its count; (BOUNDARY, 0) when there is none."""
    valid = after != BOUNDARY
    if not valid.any():
        return BOUNDARY, 0
    values, counts = np.unique(after[valid], return_counts=True)
    top = counts.max()
    tied = values[counts == top]
    if len(tied) == 1:
        return int(tied[0]), int(top)
    among = np.isin(after, tied)
    return int(after[among][ends[among].argmax()]), int(top)
