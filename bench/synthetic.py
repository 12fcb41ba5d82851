"""Token-id workloads with synthetic lengths: fixed (random), ShareGPT-like, long-context.

Prompts are token ids drawn uniformly from [FIRST_ORDINARY_TOKEN_ID, vocab_size), so their
length is exact whatever the tokenizer; outputs ask for a length and are meant to be run with
eos ignored (`--ignore-eos`, the default), as vLLM's `benchmark_serving` does for its random
dataset. Every generator takes a seed and draws from numpy's PCG64.

ShareGPT-like lengths (`ShareGPTLike`) are lognormal, rounded and clipped to [min, max]:

    input  ~ LogNormal(mu = ln(input_median),  sigma = input_sigma)    default median 160, sigma 1.0
    output ~ LogNormal(mu = ln(output_median), sigma = output_sigma)   default median 180, sigma 0.9

so before clipping the mean input is 160 * e^(1.0^2 / 2) ~ 264 tokens and the mean output
180 * e^(0.9^2 / 2) ~ 270 tokens, with a long right tail. These are chosen to resemble the
ShareGPT conversations that vLLM's benchmark samples (a few hundred tokens each way, heavy
tail); they are not a fit to that data set. Clipping (not resampling) keeps the request count
and order independent of the bounds, so the same seed with tighter bounds gives the same
requests, shortened (each request draws its token ids from its own seeded stream).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.workload import FIRST_ORDINARY_TOKEN_ID, BenchRequest, require_vocab


def random_token_ids(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    """`length` token ids uniform in [FIRST_ORDINARY_TOKEN_ID, vocab_size)."""
    return rng.integers(FIRST_ORDINARY_TOKEN_ID, vocab_size, size=length).tolist()


def uniform_lengths(
    rng: np.random.Generator, center: int, range_ratio: float, count: int
) -> np.ndarray:
    """Integers uniform in [center * (1 - r), center * (1 + r)], at least 1 (vLLM's random)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(center * (1 - range_ratio)))
    high = max(low, math.ceil(center * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=count)


def lognormal_lengths(
    rng: np.random.Generator, median: float, sigma: float, bounds: tuple[int, int], count: int
) -> np.ndarray:
    """Lognormal lengths with the given median (tokens) and log-space sigma, clipped to bounds."""
    if median <= 0 or sigma < 0:
        raise ValueError(f"lognormal needs median > 0 and sigma >= 0, got {median}, {sigma}")
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=count)
    return np.clip(np.rint(raw), bounds[0], bounds[1]).astype(np.int64)


REQUEST_STREAM = 1  # substream kinds; nonzero because SeedSequence ignores trailing zeros
PREFIX_STREAM = 2


def substream(seed: int, kind: int, index: int) -> np.random.Generator:
    """An independent generator for item `index` of one kind, distinct from default_rng(seed)."""
    return np.random.default_rng((seed, index, kind))


def request_rng(seed: int, index: int) -> np.random.Generator:
    """Request `index`'s own stream: its tokens do not depend on other requests' lengths."""
    return substream(seed, REQUEST_STREAM, index)


def _token_requests(
    seed: int, inputs: np.ndarray, outputs: np.ndarray, vocab_size: int
) -> list[BenchRequest]:
    return [
        BenchRequest(i, random_token_ids(request_rng(seed, i), int(n_in), vocab_size), int(n_out))
        for i, (n_in, n_out) in enumerate(zip(inputs, outputs, strict=True))
    ]


@dataclass(slots=True)
class FixedLengths:
    """Prompts of `input_len` tokens and outputs of `output_len`, each spread uniformly by
    +/- `range_ratio` (0 = exactly fixed), like vLLM's random dataset."""

    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    name: str = "fixed"

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        vocab = require_vocab(vocab_size, self.name)
        rng = np.random.default_rng(seed)
        inputs = uniform_lengths(rng, self.input_len, self.range_ratio, num_requests)
        outputs = uniform_lengths(rng, self.output_len, self.range_ratio, num_requests)
        return _token_requests(seed, inputs, outputs, vocab)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def long_context(
    input_len: int = 8192, output_len: int = 128, range_ratio: float = 0.1
) -> FixedLengths:
    """Long prompts, short answers: prefill-bound requests (document QA, RAG)."""
    return FixedLengths(input_len, output_len, range_ratio, name="long")


@dataclass(slots=True)
class ShareGPTLike:
    """Lognormal input and output lengths shaped like ShareGPT chats (module docstring)."""

    input_median: float = 160.0
    input_sigma: float = 1.0
    output_median: float = 180.0
    output_sigma: float = 0.9
    min_input: int = 4
    max_input: int = 2048
    min_output: int = 1
    max_output: int = 1024
    name: str = "sharegpt"

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        vocab = require_vocab(vocab_size, self.name)
        rng = np.random.default_rng(seed)
        inputs = lognormal_lengths(
            rng, self.input_median, self.input_sigma, (self.min_input, self.max_input),
            num_requests,
        )
        outputs = lognormal_lengths(
            rng, self.output_median, self.output_sigma, (self.min_output, self.max_output),
            num_requests,
        )
        return _token_requests(seed, inputs, outputs, vocab)

    def describe(self) -> dict[str, Any]:
        return asdict(self)
