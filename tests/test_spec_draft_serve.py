"""Draft-model speculative decoding through the router, against real worker processes: a decode
worker that drafts behind a prefill worker that does not (its drafter starts from the tokens
the hand-off brings: the prompt and the first token), and a colocated worker that drafts.

The drafter is the target's own weights, so every draft must be accepted: a draft cache that
missed or misplaced a position after the hand-off, a preemption or a prefix hit would show as a
rejection (tests.spec_serve)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.spec_serve import check_every_draft_accepted, drafting_cluster


@pytest.fixture(scope="module")
def cluster(tiny_model) -> Iterator[dict]:
    model_dir = tiny_model("qwen2")
    spec = {"method": "draft_model", "model": str(model_dir), "num_speculative_tokens": 3}
    with drafting_cluster(model_dir, spec, prefill_too=False) as running:
        yield running


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_greedy_outputs_equal_and_every_draft_is_accepted(cluster, topology):
    check_every_draft_accepted(cluster, topology)
