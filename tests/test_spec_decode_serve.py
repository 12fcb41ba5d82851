"""Speculative decoding through the router, against real worker processes: a decode worker
that drafts behind a prefill worker, and a colocated worker that drafts; n-gram drafting (the
prefill worker without it), and an MLP speculator trained by `baton train-speculator` (the
prefill worker with it: it sends the last prompt hidden state with the KV). Greedy outputs equal the
engine's without drafts, streamed and not; the workers' metrics count drafts and accepted tokens
under vLLM's names; every block goes back."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from common.sampling_params import SamplingParams
from engine import LLM
from engine.spec_decode.train_mlp import TrainOptions, train_speculator
from router.testing import RouterThread
from tests.workers import assert_all_free, pd_and_colocated_routers, started_at_once

NUM_BLOCKS = 96
SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                   "prompt_lookup_max": 3})  # fmt: skip
MOTIFS = [[17, 230, 41, 99], [5, 6, 7, 300, 301], [88, 12, 88, 13, 88], [250, 251]]
PROMPTS = [(m * 6)[: 10 + 3 * i] for i, m in enumerate(MOTIFS)]
MAX_TOKENS = 32


@pytest.fixture(scope="module", params=["ngram", "mlp_speculator"])
def cluster(request, tiny_model, tmp_path_factory) -> Iterator[dict]:
    model_dir = tiny_model("llama")
    spec = SPEC if request.param == "ngram" else _mlp_spec(model_dir, tmp_path_factory)
    ports = {"decode": free_port(), "colocated": free_port()}
    flags = ("--num-kv-blocks", str(NUM_BLOCKS))
    prefill_flags = flags if request.param == "ngram" else (*flags, "--speculative-config", spec)
    specs = {
        "prefill": ("prefill_service", prefill_flags),
        "decode": ("decode_service", (*flags, "--speculative-config", spec,
                                      "--metrics-port", str(ports["decode"]))),
        "colocated": ("decode_service", (*flags, "--role", "colocated", "--speculative-config",
                                         spec, "--metrics-port", str(ports["colocated"]))),
    }  # fmt: skip
    with (
        started_at_once(model_dir, specs) as addresses,
        pd_and_colocated_routers(model_dir, addresses) as routers,
    ):
        yield {"model": model_dir, "addresses": addresses, "ports": ports, "routers": routers,
               "spec": spec, "method": request.param}  # fmt: skip


def _mlp_spec(model_dir, tmp_path_factory) -> str:
    """An MLP speculator trained for a few steps, as --speculative-config JSON."""
    out = tmp_path_factory.mktemp("mlp-spec")
    options = TrainOptions(model=model_dir, out=out, seq_len=16, batch_size=4, stage1_steps=6,
                           stage2_steps=4, stage2_prompts=4, threads=1)  # fmt: skip
    train_speculator(options, progress=False)
    return json.dumps({"method": "mlp_speculator", "model": str(out)})


def _expected(model_dir) -> list[str]:
    llm = LLM(str(model_dir), num_kv_blocks=NUM_BLOCKS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _offline_drafts(model_dir, spec: str) -> int:
    """Verify steps with drafts for PROMPTS one after another in this process's engine."""
    llm = LLM(str(model_dir), num_kv_blocks=NUM_BLOCKS, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for prompt in PROMPTS:
        llm.generate([prompt], params, use_tqdm=False)
    return llm.engine.core.scheduler.spec_stats.num_drafts


def _texts(router: RouterThread, stream: bool) -> list[str]:
    client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)
    kwargs = {"model": "", "temperature": 0, "max_tokens": MAX_TOKENS,
              "extra_body": {"ignore_eos": True}}  # fmt: skip
    texts = []
    for prompt in PROMPTS:
        if stream:
            chunks = client.completions.create(prompt=prompt, stream=True, **kwargs)
            texts.append("".join(c.choices[0].text for c in chunks if c.choices))
        else:
            texts.append(client.completions.create(prompt=prompt, **kwargs).choices[0].text)
    return texts


def _spec_counters(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("baton:spec_decode_") and "position" not in s.labels
    }


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_greedy_outputs_equal_the_engine_without_drafts(cluster, topology):
    expected = _expected(cluster["model"])
    router = cluster["routers"][topology]
    worker = "decode" if topology == "disaggregated" else "colocated"
    before = _spec_counters(cluster["ports"][worker])
    assert _texts(router, stream=False) == expected
    assert _texts(router, stream=True) == expected
    after = _spec_counters(cluster["ports"][worker])
    drafts = after["baton:spec_decode_num_drafts_total"] - before.get(
        "baton:spec_decode_num_drafts_total", 0
    )
    accepted = after["baton:spec_decode_num_accepted_tokens_total"] - before.get(
        "baton:spec_decode_num_accepted_tokens_total", 0
    )
    assert drafts > 0 and (accepted > 0 or cluster["method"] == "mlp_speculator")
    if cluster["method"] == "mlp_speculator":  # drafting from the first decode step on, as offline
        assert drafts == 2 * _offline_drafts(cluster["model"], cluster["spec"])
    assert (
        after["baton:spec_decode_num_draft_tokens_total"]
        >= after["baton:spec_decode_num_accepted_tokens_total"]
    )
    assert_all_free(cluster["addresses"], NUM_BLOCKS)
