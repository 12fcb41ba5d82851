"""EAGLE speculative decoding through the router, against real worker processes: a decode
worker that drafts behind a prefill worker that sends the prompt's states with the KV, and a
colocated worker that drafts.

The head predicts the (bigram) target exactly (tests.test_spec_eagle), so every draft must be
accepted: an entry missed or misplaced after the hand-off, a preemption or a prefix hit would
show as a rejection (tests.spec_serve)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.spec_serve import check_every_draft_accepted, drafting_cluster
from tests.test_spec_eagle import bigram_target, exact_eagle_head


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("eagle")
    model_dir = bigram_target(tiny_model("qwen2"), root / "target")
    head = exact_eagle_head(root / "head", model_dir)
    spec = {"method": "eagle", "model": str(head), "num_speculative_tokens": 3}
    with drafting_cluster(model_dir, spec, prefill_too=True) as running:
        yield running


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_greedy_outputs_equal_and_every_draft_is_accepted(cluster, topology):
    check_every_draft_accepted(cluster, topology)
