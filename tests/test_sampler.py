"""Sampler: each logits transform on hand-computed cases, greedy/random sampling, seeded
reproducibility, sampling frequencies, and logprobs against torch.log_softmax."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from engine.sampling import (
    Logprob,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    compute_prompt_logprobs,
    to_logprob_dict,
)
from engine.sampling.processors import apply_logits_processors
from engine.sampling.topk_topp import apply_min_p, apply_top_k_top_p
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
INF = float("inf")


def make_row(
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    eos: Sequence[int] = (0,),
) -> SamplingRow:
    generator = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt), list(output), generator, list(eos))


def processed(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Logits after allowed ids, bias, min_tokens and penalties."""
    out = logits.clone()
    apply_logits_processors(out, SamplingMetadata.build(rows, logits.shape[1], CPU))
    return out


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    metadata = SamplingMetadata.build(rows, logits.shape[1], CPU)
    return Sampler()(logits, metadata).sampled_token_ids


# ---- logits processors ----------------------------------------------------------------------


def test_metadata_skips_unused_transforms() -> None:
    metadata = SamplingMetadata.build([make_row(SamplingParams())] * 3, 10, CPU)
    assert metadata.all_random and not metadata.all_greedy
    assert metadata.top_k is None and metadata.top_p is None and metadata.min_p is None
    assert metadata.penalties is None and metadata.logit_bias is None
    assert metadata.allowed_tokens is None and metadata.min_tokens_bans is None
    assert metadata.max_num_logprobs is None and metadata.greedy_mask is None


def test_penalties_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0], [2.0, -1.0, 0.5, 3.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [make_row(params, prompt=[0], output=[1, 3, 3]), make_row(SamplingParams(), output=[1])]
    # repetition over {0, 1, 3}: 2/2, -1*2, 3/2; frequency: -0.5*count; presence: -0.25.
    expected = torch.tensor([[1.0, -2.75, 0.5, 0.25, 1.0], [2.0, -1.0, 0.5, 3.0, 1.0]])
    torch.testing.assert_close(processed(logits, rows), expected)


def test_repetition_penalty_counts_prompt_only_for_repetition() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    rows = [make_row(SamplingParams(presence_penalty=1.0), prompt=[0, 1], output=[2])]
    torch.testing.assert_close(processed(logits, rows), torch.tensor([[2.0, -1.0, -0.5]]))


def test_logit_bias_and_allowed_token_ids() -> None:
    logits = torch.zeros(3, 6)
    rows = [
        make_row(SamplingParams(logit_bias={1: 2.5, 4: -1.0})),
        make_row(SamplingParams(allowed_token_ids=[2, 5], logit_bias={5: 1.0, 0: 3.0})),
        make_row(SamplingParams()),
    ]
    expected = torch.tensor(
        [
            [0.0, 2.5, 0.0, 0.0, -1.0, 0.0],
            [-INF, -INF, 0.0, -INF, -INF, 1.0],  # bias on a disallowed id stays -inf
            [0.0] * 6,
        ]
    )
    torch.testing.assert_close(processed(logits, rows), expected)


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(4, 5)
    params = SamplingParams(min_tokens=2, stop_token_ids=[3])
    rows = [
        make_row(params, output=[1], eos=[0]),  # 1 < 2: ban eos 0 and stop id 3
        make_row(params, output=[1, 2], eos=[0]),  # reached: nothing banned
        make_row(SamplingParams(min_tokens=2, ignore_eos=True), eos=[0]),  # eos is a normal token
        make_row(SamplingParams(), eos=[0]),
    ]
    out = processed(logits, rows)
    assert torch.isinf(out).nonzero().tolist() == [[0, 0], [0, 3]]


@pytest.mark.parametrize(
    ("top_k", "top_p", "kept"),
    [
        (2, 1.0, {0, 2}),
        (0, 0.8, {0, 2, 3}),
        (0, 0.6, {0, 2}),
        (0, 0.45, {0}),
        (3, 0.6, {0, 2}),
        (4, 0.99, {0, 2, 3, 4}),
    ],
)
def test_top_k_top_p_keep_exact_set(top_k: int, top_p: float, kept: set[int]) -> None:
    probs = torch.tensor([0.5, 0.05, 0.2, 0.15, 0.1])
    logits = probs.log().repeat(2, 1)
    k = torch.tensor([top_k if top_k else 5, 5])
    p = torch.tensor([top_p, 1.0])
    out = apply_top_k_top_p(logits.clone(), k if top_k else None, p if top_p < 1 else None)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == kept
    assert torch.isfinite(out[1]).all()  # a row with both disabled keeps everything
    assert torch.equal(out[0][list(kept)], logits[0][list(kept)])


@pytest.mark.parametrize(("min_p", "kept"), [(0.35, {0, 2}), (0.25, {0, 2, 3}), (0.0, None)])
def test_min_p_keeps_exact_set(min_p: float, kept: set[int] | None) -> None:
    logits = torch.tensor([[0.5, 0.05, 0.2, 0.15, 0.1]]).log()
    apply_min_p(logits, torch.tensor([min_p]))
    finite = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    assert finite == (kept if kept is not None else set(range(5)))


def test_sampled_tokens_stay_in_truncated_set() -> None:
    logits = torch.tensor([0.5, 0.05, 0.2, 0.15, 0.1]).log().repeat(2000, 1)
    cases = [
        (SamplingParams(top_k=2), {0, 2}),
        (SamplingParams(top_p=0.8), {0, 2, 3}),
        (SamplingParams(min_p=0.35), {0, 2}),
    ]
    for params, kept in cases:
        tokens = sample(logits, [make_row(params)] * 2000)
        assert set(tokens.tolist()) == kept


# ---- greedy and random sampling ---------------------------------------------------------------


def test_greedy_is_argmax_after_processing() -> None:
    logits = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    rows = [make_row(SamplingParams(temperature=0.0)) for _ in range(5)]
    rows.append(make_row(SamplingParams(temperature=0.0, logit_bias={7: 100.0})))
    expected = logits.argmax(dim=-1)
    expected[5] = 7
    assert torch.equal(sample(logits, rows), expected)


def test_mixed_batch_greedy_rows_take_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    rows = [
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(temperature=1.5, top_k=3, seed=4)),
        make_row(SamplingParams(temperature=0.0)),
        make_row(SamplingParams(top_p=0.5)),
    ]
    out = sample(logits, rows)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out[1] in logits[1].topk(3).indices


def test_caller_logits_untouched() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    rows = [make_row(SamplingParams(temperature=0.5, top_p=0.5, presence_penalty=1.0, logprobs=2))]
    sample(logits, rows * 2)
    assert torch.equal(logits, before)


def _run_steps(
    seeded: SamplingParams, others: list[SamplingParams], position: int, steps: int
) -> list[int]:
    """Sample `steps` tokens for `seeded` placed at `position` among `others`."""
    target_logits = torch.Generator().manual_seed(123)
    other_logits = torch.Generator().manual_seed(456)
    target = make_row(seeded, prompt=[1, 2, 3])
    other_rows = [make_row(p, prompt=[4]) for p in others]
    tokens: list[int] = []
    for _ in range(steps):
        rows = list(other_rows)
        rows.insert(position, target)
        logits = torch.randn(len(rows), 64, generator=other_logits)  # (N, V)
        logits[position] = torch.randn(64, generator=target_logits)
        token = int(sample(logits, rows)[position])
        tokens.append(token)
        target.output_token_ids = [*target.output_token_ids, token]
    return tokens


def test_seeded_sampling_independent_of_batch() -> None:
    seeded = SamplingParams(seed=7, temperature=0.9, top_p=0.95, min_p=0.01, presence_penalty=0.5)
    alone = [_run_steps(seeded, [], 0, 40) for _ in range(2)]
    assert alone[0] == alone[1]
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=5),
        SamplingParams(seed=99, top_p=0.3, repetition_penalty=1.3),
        SamplingParams(logprobs=3, min_p=0.2, logit_bias={1: 5.0}),
    ]
    assert _run_steps(seeded, others, 2, 40) == alone[0]
    assert _run_steps(seeded, others[::-1], 4, 40) == alone[0]
    assert _run_steps(seeded.clone(), others[:1], 0, 40) == alone[0]
    different_seed = SamplingParams(seed=8, temperature=0.9, top_p=0.95, min_p=0.01)
    assert _run_steps(different_seed, [], 0, 40) != alone[0]


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    nonzero = expected > 0
    assert counts[~nonzero].sum() == 0, "sampled a token of probability 0"
    return float(((counts - expected)[nonzero] ** 2 / expected[nonzero]).sum())


@pytest.mark.parametrize(
    "kwargs", [{}, {"temperature": 0.5}, {"temperature": 1.7, "top_k": 4}, {"top_p": 0.7}]
)
def test_sampling_frequencies_match_distribution(kwargs: dict[str, float]) -> None:
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 0.7, 1.2])
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    expected = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k:
        expected[expected < expected.topk(params.top_k).values[-1]] = 0
    if params.top_p < 1:
        order = expected.argsort(descending=True)
        keep = expected[order].cumsum(0) - expected[order] < params.top_p
        expected[order[~keep]] = 0
    expected /= expected.sum()
    num = 20000
    with torch.random.fork_rng():
        torch.manual_seed(2024)  # fixed seed: deterministic, cannot flake
        tokens = sample(logits.repeat(num, 1), [make_row(params)] * num)
    # 8 categories: chi-square > 30 has p < 1e-4 under the null.
    assert _chi_square(tokens, expected) < 30.0


def test_seeded_frequencies_match_distribution() -> None:
    logits = torch.tensor([0.3, -0.2, 1.1, 0.0])
    generator_rows = [make_row(SamplingParams(seed=s)) for s in range(3000)]
    tokens = sample(logits.repeat(3000, 1), generator_rows)
    assert _chi_square(tokens, torch.softmax(logits, dim=-1)) < 25.0


# ---- logprobs ---------------------------------------------------------------------------------


def test_raw_logprobs_and_ranks() -> None:
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5)) * 3
    rows = [
        make_row(SamplingParams(logprobs=3, logit_bias={11: 100.0})),  # sampled = 11, not argmax
        make_row(SamplingParams()),
        make_row(SamplingParams(logprobs=0, temperature=0.0)),
        make_row(SamplingParams(logprobs=1, repetition_penalty=1.5), output=[1, 2]),
    ]
    out = Sampler()(logits, SamplingMetadata.build(rows, 40, CPU))
    assert out.logprobs is not None
    reference = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert sampled[0] == 11
    assert out.logprobs.token_ids.shape == (4, 4) and out.logprobs.token_ids.dtype == torch.int64
    assert torch.equal(out.logprobs.token_ids[:, 0], sampled)
    torch.testing.assert_close(
        out.logprobs.logprobs[:, 0], reference.gather(1, sampled[:, None])[:, 0], atol=1e-6, rtol=0
    )
    top = reference.topk(3, dim=-1)
    assert torch.equal(out.logprobs.token_ids[:, 1:], top.indices)
    torch.testing.assert_close(out.logprobs.logprobs[:, 1:], top.values, atol=1e-6, rtol=0)
    order = reference.argsort(dim=-1, descending=True)
    expected_ranks = [order[i].tolist().index(int(sampled[i])) + 1 for i in range(4)]
    assert out.logprobs.ranks.tolist() == expected_ranks
    assert out.logprobs.ranks[2] == 1  # greedy sample is the most likely


def test_full_vocab_logprobs_and_none() -> None:
    logits = torch.randn(2, 12)
    rows = [make_row(SamplingParams(logprobs=-1)), make_row(SamplingParams(logprobs=2))]
    out = Sampler()(logits, SamplingMetadata.build(rows, 12, CPU))
    assert out.logprobs is not None and out.logprobs.logprobs.shape == (2, 13)
    none = Sampler()(logits, SamplingMetadata.build([make_row(SamplingParams())] * 2, 12, CPU))
    assert none.logprobs is None


def test_prompt_logprobs() -> None:
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(9))
    targets = torch.tensor([3, 0, 29, 7, 7])
    result = compute_prompt_logprobs(logits, targets, 2)
    reference = torch.log_softmax(logits, dim=-1)
    assert torch.equal(result.token_ids[:, 0], targets)
    torch.testing.assert_close(
        result.logprobs[:, 0], reference[torch.arange(5), targets], atol=1e-6, rtol=0
    )
    greater = (reference > reference[torch.arange(5), targets][:, None]).sum(-1) + 1
    assert torch.equal(result.ranks, greater)
    assert compute_prompt_logprobs(logits, targets, -1).token_ids.shape == (5, 31)


def test_to_logprob_dict() -> None:
    ids = torch.tensor([9, 4, 9, 2])
    values = torch.tensor([-1.5, -0.1, -1.5, -2.0], dtype=torch.float64)
    result = to_logprob_dict(ids, values, sampled_rank=2, num_requested=1, decode=str)
    assert result == {9: Logprob(-1.5, 2, "9"), 4: Logprob(-0.1, 1, "4")}
    everything = to_logprob_dict([4, 4, 9], [-0.1, -0.1, -1.5], 1, -1, None)
    assert list(everything) == [4, 9]
    assert everything[9] == Logprob(-1.5, 2, None)
    assert math.isclose(everything[4].logprob, -0.1) and everything[4].rank == 1
