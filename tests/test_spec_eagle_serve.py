"""EAGLE speculative decoding through the router, against real worker processes: a decode
worker that drafts behind a prefill worker that sends the prompt's states with the KV, and a
colocated worker that drafts.

The head predicts the (bigram) target exactly (tests.test_spec_eagle), so every draft must be
accepted: an entry missed or misplaced after the hand-off, a preemption or a prefix hit would
show as a rejection. Requests run concurrently on a small KV cache (preemption) and twice
(prefix hits); greedy outputs equal the engine's without drafts; every block goes back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from common.sampling_params import SamplingParams
from engine import LLM
from router.testing import RouterThread
from tests.test_spec_eagle import bigram_target, exact_eagle_head
from tests.workers import assert_all_free, pd_and_colocated_routers, started_at_once

NUM_BLOCKS = 10  # 16 tokens each: fewer than the concurrent requests grow to (preemption)
PROMPTS = [[17, 230, 41, 99] * 3, [5, 6, 7, 300, 301] * 4, [88, 12, 88, 13] * 5, [250, 251] * 7]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("eagle")
    model_dir = bigram_target(tiny_model("qwen2"), root / "target")
    head = exact_eagle_head(root / "head", model_dir)
    spec = json.dumps({"method": "eagle", "model": str(head), "num_speculative_tokens": 3})
    ports = {"decode": free_port(), "colocated": free_port()}
    flags = ("--num-kv-blocks", str(NUM_BLOCKS))
    specs = {
        "prefill": ("prefill_service", (*flags, "--speculative-config", spec)),
        "decode": ("decode_service", (*flags, "--speculative-config", spec,
                                      "--metrics-port", str(ports["decode"]))),
        "colocated": ("decode_service", (*flags, "--role", "colocated", "--speculative-config",
                                         spec, "--metrics-port", str(ports["colocated"]))),
    }  # fmt: skip
    with (
        started_at_once(model_dir, specs) as addresses,
        pd_and_colocated_routers(model_dir, addresses) as routers,
    ):
        yield {"model": model_dir, "addresses": addresses, "ports": ports, "routers": routers}


def _expected(model_dir) -> list[str]:
    llm = LLM(str(model_dir))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _texts(router: RouterThread, stream: bool) -> list[str]:
    """Every prompt's completion, the requests sent at once."""
    client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)
    kwargs = {"model": "", "temperature": 0, "max_tokens": MAX_TOKENS,
              "extra_body": {"ignore_eos": True}}  # fmt: skip

    def one(prompt: list[int]) -> str:
        if stream:
            chunks = client.completions.create(prompt=prompt, stream=True, **kwargs)
            return "".join(c.choices[0].text for c in chunks if c.choices)
        return client.completions.create(prompt=prompt, **kwargs).choices[0].text

    with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def _counters(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.endswith("_total") and "position" not in s.labels
    }


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_greedy_outputs_equal_and_every_draft_is_accepted(cluster, topology):
    expected = _expected(cluster["model"])
    router = cluster["routers"][topology]
    port = cluster["ports"]["decode" if topology == "disaggregated" else "colocated"]
    before = _counters(port)
    assert _texts(router, stream=False) == expected
    assert _texts(router, stream=True) == expected  # the same prompts again: prefix hits
    after = _counters(port)

    def grew(name: str) -> float:
        return after[f"baton:{name}_total"] - before.get(f"baton:{name}_total", 0)

    assert grew("spec_decode_num_drafts") > 0
    assert grew("spec_decode_num_accepted_tokens") == grew("spec_decode_num_draft_tokens") > 0
    assert grew("num_preemptions") > 0 and grew("prefix_cache_hits") > 0
    assert_all_free(cluster["addresses"], NUM_BLOCKS)
