"""Structured outputs on a GPU: the bitmask kernel, and greedy structured requests kept in CUDA
graphs and asynchronous scheduling (their masks filled while the next forward pass runs)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SCHEMA = {
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {"type": "integer", "minimum": -20, "maximum": 20},
            "minItems": 1,
            "maxItems": 3,
        },
        "ok": {"type": "boolean"},
    },
    "required": ["tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-f]{3,9}-[0-9]{2}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [70, 128256])
def test_bitmask_kernel_matches_the_host(dtype, vocab):
    from engine.structured.bitmask import allocate_bitmask, apply_token_bitmask

    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    bitmask = allocate_bitmask(5, vocab, pin=True)
    bits = torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=gen, dtype=torch.int64)
    bitmask.copy_(bits.to(torch.int32))
    on_gpu = logits.cuda()
    apply_token_bitmask(on_gpu, bitmask, [4, 1, 2])  # from pinned host memory
    apply_token_bitmask(logits, bitmask, [4, 1, 2])
    assert torch.equal(on_gpu.cpu(), logits)
    assert logits[[0, 3]].isfinite().all() and not logits[[1, 2, 4]].isfinite().all()


def test_structured_greedy_keeps_graphs_and_async_scheduling(tiny_model):
    """Greedy structured requests (a schema, a regex) mixed with plain ones, with async
    scheduling on and off: the same tokens, valid outputs, steps chained (none deferred) and
    decode steps replayed from CUDA graphs."""
    from engine import LLM, SamplingParams, StructuredOutputsParams

    specs = [
        StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True),
        StructuredOutputsParams(regex=REGEX),
        None,
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=48, structured_outputs=so)
        for so in specs for _ in range(4)
    ]  # fmt: skip
    prompts = [[11 + i, 12, 13] * (1 + i % 5) for i in range(len(params))]
    outputs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(tiny_model("llama")), device="cuda", max_num_seqs=16,
                  kv_cache_memory_bytes=1 << 28, async_scheduling=async_scheduling)  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        for out in outs[:4]:
            jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
        assert all(re.fullmatch(REGEX, o.outputs[0].text) for o in outs[4:8])
        core = llm.engine.core
        if async_scheduling:
            assert core.num_chained_steps > 0 and core.num_deferred_steps == 0
        assert core.runner.graphs.replays > 0
        llm.check_integrity()
        outputs[async_scheduling] = [o.outputs[0].token_ids for o in outs]
    assert outputs[True] == outputs[False]
