"""The engine on a GPU (torch attention backend): greedy tokens equal transformers' on the GPU."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_float32_on_gpu_matches_transformers(tiny_model, arch, backend):
    """Mixed prefill chunks and decodes, a prompt beyond the step budget, mistral's window."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from engine import LLM, SamplingParams

    model_dir = tiny_model(arch)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 7, 33, 70, 150)]
    llm = LLM(str(model_dir), device="cuda", max_num_batched_tokens=64,
              kv_cache_memory_bytes=1 << 28, kernel_backend=backend)  # fmt: skip
    runner = llm.engine.core.runner
    assert runner.kernels.describe()["kernel_backend"] == backend
    attention = runner.model.model.layers[0].self_attn.attn.backend
    assert type(attention).__name__.lower().startswith(backend)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        expected.append(out[0, len(p) :].tolist())
    assert got == expected
    llm.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_graph_decode_equals_eager(tiny_model, arch):
    """Decode batches of sizes between captured ones (padded), and short prompt chunks run as
    graph rows (alone, beside decodes, after a cached prefix), give the eager engine's tokens."""
    from engine import LLM, SamplingParams

    model_dir = tiny_model(arch)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 90))] for _ in range(11)]
    prompts += [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 16, 5)]
    # The same prompts longer: their cached blocks leave chunks that start past position 0.
    longer = [p + [rng.randrange(3, 512) for _ in range(6)] for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for eager in (False, True):
        llm = LLM(str(model_dir), device="cuda", max_num_seqs=16, enforce_eager=eager,
                  kv_cache_memory_bytes=1 << 28)  # fmt: skip
        runner = llm.engine.core.runner
        graphs = runner.graphs
        assert (graphs is None) == eager
        outputs[eager] = [
            o.outputs[0].token_ids
            for batch in (prompts, longer, [longer[-1]])
            for o in llm.generate(batch, params, use_tqdm=False)
        ]
        if graphs is not None:
            assert graphs.replays > 0
            assert graphs.sizes == [1, 2, 4, 8, 16]
            assert runner.graph_prompt_steps > 0
        else:
            assert runner.graph_prompt_steps == 0
        llm.check_integrity()
    assert outputs[False] == outputs[True]


def test_async_scheduling_equals_sync_on_gpu(tiny_model):
    """Decode steps launched before the previous tokens are read (CUDA graphs fed by the
    previous argmax on the device) give the synchronous engine's outputs, with requests
    ending by length and by stop token at different steps."""
    from engine import LLM, SamplingParams

    model_dir = tiny_model("llama")
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 90))] for _ in range(11)]
    lengths = [SamplingParams(temperature=0, max_tokens=20 + i, ignore_eos=True) for i in range(11)]
    outputs = {}
    for async_scheduling in (False, True):
        llm = LLM(str(model_dir), device="cuda", max_num_seqs=16, kv_cache_memory_bytes=1 << 28,
                  async_scheduling=async_scheduling)  # fmt: skip
        first = [o.outputs[0].token_ids for o in llm.generate(prompts, lengths, use_tqdm=False)]
        stops = [
            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                           stop_token_ids=[tokens[3 + i]])  # fmt: skip
            for i, tokens in enumerate(first)
        ]
        second = [
            (o.outputs[0].token_ids, o.outputs[0].finish_reason)
            for o in llm.generate(prompts, stops, use_tqdm=False)
        ]
        assert (llm.engine.core.num_chained_steps > 0) == async_scheduling
        assert llm.engine.core.runner.graphs.replays > 0
        llm.check_integrity()
        outputs[async_scheduling] = (first, second)
    assert outputs[True] == outputs[False]
    assert any(reason == "stop" for _, reason in outputs[True][1])
