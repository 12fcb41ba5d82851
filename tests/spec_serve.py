"""Speculative decoding through the router against real worker processes, for drafters that
must get every draft accepted (the target as its own draft model; an EAGLE head that predicts
its bigram target exactly): a decode worker drafting behind a prefill worker, and a colocated
worker drafting. Requests run concurrently on a small KV cache (preemption) and twice (prefix
hits); greedy outputs equal the engine's without drafts; every block goes back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from common.sampling_params import SamplingParams
from engine import LLM
from router.testing import RouterThread
from tests.workers import assert_all_free, pd_and_colocated_routers, started_at_once

NUM_BLOCKS = 10  # 16 tokens each: fewer than the concurrent requests grow to (preemption)
PROMPTS = [[17, 230, 41, 99] * 3, [5, 6, 7, 300, 301] * 4, [88, 12, 88, 13] * 5, [250, 251] * 7]
MAX_TOKENS = 40


@contextmanager
def drafting_cluster(model_dir: Path, spec: dict[str, Any], prefill_too: bool) -> Iterator[dict]:
    """Prefill, decode and colocated workers (the last two drafting with `spec`; the prefill
    worker too when `prefill_too`: it then sends what the drafter needs with the KV) and a
    router for each topology."""
    spec_json = json.dumps(spec)
    ports = {"decode": free_port(), "colocated": free_port()}
    flags = ("--num-kv-blocks", str(NUM_BLOCKS))
    drafting = ("--speculative-config", spec_json)
    specs = {
        "prefill": ("prefill_service", (*flags, *(drafting if prefill_too else ()))),
        "decode": ("decode_service", (*flags, *drafting, "--metrics-port", str(ports["decode"]))),
        "colocated": ("decode_service", (*flags, "--role", "colocated", *drafting,
                                         "--metrics-port", str(ports["colocated"]))),
    }  # fmt: skip
    with (
        started_at_once(model_dir, specs) as addresses,
        pd_and_colocated_routers(model_dir, addresses) as routers,
    ):
        yield {"model": model_dir, "addresses": addresses, "ports": ports, "routers": routers}


def check_every_draft_accepted(cluster: dict, topology: str) -> None:
    """Greedy outputs (plain, then streamed: prefix hits) equal the engine's without drafts,
    every draft was accepted, preemptions and prefix hits happened, no block is left held."""
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


def _expected(model_dir: Path) -> list[str]:
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
