"""GPU benchmarks of Baton's engine against transformers, each baseline measured in the same run.

One random-weight model with Llama-3.2-1B's shape in bfloat16 serves three benchmarks:

    decode      batch-1 decode tokens/s; also the roofline (device copy bandwidth / weight bytes)
    concurrent  128 requests at once, 512-token prompts, 128 output tokens each: output tokens/s
                (transformers: `generate` on the padded-free (128, 512) batch, static cache)
    prefill     seconds to process one 8,192-token prompt (transformers: one forward pass)

Baton's engine and the transformers model are never on the GPU at the same time. A section that
fails records `{"error": ...}` and the others still run.

    python -m bench.gpu_engine [--only decode,concurrent,prefill] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.machine import describe_machine, git_commit

SHAPE: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,  # as the real Llama-3.2-1B: room for the 8,192-token prompt
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
SECTIONS = ("decode", "concurrent", "prefill")
AIMS = {
    "decode_fraction_of_roofline": 0.70,  # at least
    "concurrent_baton_over_transformers": 4.0,  # at least
    "prefill_baton_over_transformers": 1.1,  # at most (a ratio of seconds)
}

DECODE_PROMPT = [100] * 16
DECODE_NEW_TOKENS = 256
CONCURRENT_REQUESTS = 128
CONCURRENT_PROMPT_TOKENS = 512
CONCURRENT_NEW_TOKENS = 128
CHUNK_TOKENS = 8192  # the engine's max_num_batched_tokens in the concurrent benchmark
BATON_REPEATS = 3  # timed runs of each Baton measurement (decode, concurrent): the median
PREFILL_TOKENS = 8192
PREFILL_WARMUPS = 2
PREFILL_RUNS = 5
TOKEN_IDS = (3, 30000)  # random prompt ids are drawn from [3, 30000)

Section = Callable[[Path], dict[str, Any]]


def make_model(
    directory: Path, tokenizer: Callable[[Path, int], None] | None = None
) -> Path:
    """A random Llama-3.2-1B-shaped model (bf16) with a tokenizer that covers its vocabulary:
    `tokenizer(directory, vocab_size)` writes it (default `write_tokenizer`, one word per id;
    `bench.byte_level_tokenizer` gives one whose tokens spell any text)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.to(torch.bfloat16).save_pretrained(directory)
    (tokenizer or write_tokenizer)(directory, SHAPE["vocab_size"])
    return directory


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer with one word per id (`<unk>`, `<s>`, `</s>`, then `w3`, `w4`,
    ...), so every token a random model samples has text, as with a real model's tokenizer:
    streamed responses then carry the first token at once (the router sends no chunk for a
    token without text, which is what out-of-vocabulary ids of a smaller tokenizer give)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the model's safetensors files: what one decode step must read."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def matmul_flops() -> float:
    """bfloat16 matmul FLOP/s at a prefill step's largest GEMM: (8,192 x 2,048) by (2,048 x
    16,384), the gate/up projection of an 8,192-token step of the benchmark's shape."""
    a = torch.randn(8192, 2048, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(2048, 16384, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * 20 / (time.perf_counter() - start)


def concurrent_bound(
    shape: dict[str, Any],
    requests: int,
    prompt_tokens: int,
    new_tokens: int,
    bandwidth: float,  # bytes/s, device copy (read + write counted)
    flops: float,  # matmul FLOP/s
) -> dict[str, Any]:
    """A lower bound on the time of `requests` requests of `prompt_tokens` prompt and
    `new_tokens` output tokens on one GPU, bfloat16: the prompts' matmul and attention FLOPs at
    `flops` (one logits row per prompt), then each later token's step reading every weight and
    each sequence's KV at `bandwidth`. Nothing else (norms, activations, launches) is counted."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    layers = shape["num_hidden_layers"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    layer_params = hidden * (hidden + 2 * kv_dim) + hidden * hidden + 3 * hidden * inter
    lm_head = shape["vocab_size"] * hidden
    causal_pairs = prompt_tokens * (prompt_tokens + 1) // 2  # (query, key) pairs per prompt
    prefill_flops = requests * (
        2 * layers * layer_params * prompt_tokens
        + 2 * lm_head
        + 4 * layers * heads * head_dim * causal_pairs  # q.k and p.v
    )
    steps = new_tokens - 1  # the first token comes out of the prompt's step
    weight_bytes = 2 * (layers * layer_params + lm_head)
    kv_bytes_per_token = 2 * layers * kv_dim * 2  # K and V, bfloat16
    # step t (1..steps) attends over prompt + t tokens for each request
    kv_tokens = requests * (steps * prompt_tokens + steps * (steps + 1) // 2)
    decode_bytes = steps * weight_bytes + kv_tokens * kv_bytes_per_token
    prefill_s, decode_s = prefill_flops / flops, decode_bytes / bandwidth
    return {
        "prefill_flops": prefill_flops,
        "prefill_seconds": prefill_s,
        "decode_bytes": decode_bytes,
        "decode_seconds": decode_s,
        "seconds": prefill_s + decode_s,
    }


def concurrent_steps(
    requests: int, prompt_tokens: int, new_tokens: int, chunk: int
) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """The steps the scheduler runs for `requests` equal prompts submitted at once, `chunk`
    tokens a step: every request past its prompt decodes one row, and the prompts fill the
    rest of the budget in order, chunked where it runs out. Returns
    - the prompt steps, each (rows, sampled rows): the decodes and prompt chunks, and the
      decodes plus the prompts that end in the step, which sample their first token;
    - then the decode-only steps, each the context lengths of its rows (the last steps have
      fewer rows, as the earlier prompts' requests finish first)."""
    left = [prompt_tokens] * requests  # prompt tokens not yet computed
    made = [0] * requests  # tokens generated
    prompt_steps: list[tuple[int, int]] = []
    decode_steps: list[list[int]] = []
    while any(n < new_tokens for n in made):
        decodes = [i for i in range(requests) if not left[i] and made[i] < new_tokens]
        budget, ended = chunk - len(decodes), []
        for i in range(requests):
            take = min(budget, left[i])
            if take:
                budget -= take
                left[i] -= take
                if not left[i]:
                    ended.append(i)
        if ended or budget < chunk - len(decodes):
            prompt_steps.append((chunk - budget, len(decodes) + len(ended)))
        else:
            decode_steps.append([prompt_tokens + made[i] for i in decodes])
        for i in decodes + ended:
            made[i] += 1
    return prompt_steps, decode_steps


def concurrent_kernel_bound(
    shape: dict[str, Any], requests: int, prompt_tokens: int, new_tokens: int, chunk: int
) -> dict[str, Any]:
    """A lower bound on the concurrent run with this machine's kernels: every step of
    `concurrent_steps` runs only its GEMMs, through cuBLAS as the engine calls them
    (`F.linear` on (N, K) weights, each layer its own copy) at the step's rows, and, in the
    decode-only steps, the decode attention kernel over the step's contexts; each timed alone
    (CUDA graphs). Norms, activations, rotary, the prompts' attention, sampling and the host
    count nothing. Below it no schedule of these kernels can go: what is left to gain lies in
    the kernels themselves."""
    from bench.graph_timing import graph_seconds, weight_copies

    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    kv_heads, head_dim = shape["num_key_value_heads"], hidden // heads
    projections = {
        "qkv_proj": (hidden + 2 * kv_heads * head_dim, hidden),
        "o_proj": (hidden, hidden),
        "gate_up_proj": (2 * inter, hidden),
        "down_proj": (hidden, inter),
    }
    dtype = torch.bfloat16
    prompt_steps, decode_steps = concurrent_steps(requests, prompt_tokens, new_tokens, chunk)

    def gemm_seconds(n: int, k: int, rows: list[int]) -> dict[int, float]:
        weights = weight_copies(n, k)
        out = {}
        for m in sorted(set(rows)):
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            out[m] = graph_seconds([partial(torch.nn.functional.linear, x, w) for w in weights])
        return out

    layer_rows = [rows for rows, _ in prompt_steps] + [len(c) for c in decode_steps]
    head_rows = [sampled for _, sampled in prompt_steps] + [len(c) for c in decode_steps]
    layer_s = {m: 0.0 for m in layer_rows}
    for n, k in projections.values():
        for m, s in gemm_seconds(n, k, layer_rows).items():
            layer_s[m] += s * layers
    head_s = gemm_seconds(shape["vocab_size"], hidden, head_rows)
    prompt_gemm = sum(layer_s[rows] + head_s[sampled] for rows, sampled in prompt_steps)
    decode_gemm = sum(layer_s[len(c)] + head_s[len(c)] for c in decode_steps)

    attention = decode_attention_seconds(shape, requests, prompt_tokens + new_tokens, decode_steps)
    return {
        "prompt_steps": len(prompt_steps),
        "decode_only_steps": len(decode_steps),
        "prompt_gemm_seconds": prompt_gemm,
        "decode_gemm_seconds": decode_gemm,
        "decode_attention_seconds": attention,
        "seconds": prompt_gemm + decode_gemm + attention,
    }


def decode_attention_seconds(
    shape: dict[str, Any], requests: int, longest_tokens: int, decode_steps: list[list[int]]
) -> float:
    """Seconds of the decode attention kernel in every layer of the decode-only steps (each
    step: its sequences' context lengths, in tokens), each timed alone in a CUDA graph."""
    from baton_kernels.paged_decode_attention import paged_decode_attention
    from bench.graph_timing import graph_seconds

    layers, heads = shape["num_hidden_layers"], shape["num_attention_heads"]
    kv_heads, head_dim = shape["num_key_value_heads"], shape["hidden_size"] // heads
    dtype, block_size = torch.bfloat16, 16
    width = -(-shape["max_position_embeddings"] // block_size)  # the engine's table width
    longest = -(-longest_tokens // block_size)
    cache = torch.randn(2, requests * longest + 1, block_size, kv_heads, head_dim, dtype=dtype,
                        device="cuda")  # fmt: skip
    tables = torch.zeros(requests, width, dtype=torch.int32, device="cuda")
    tables[:, :longest] = torch.arange(1, requests * longest + 1).view(requests, longest)
    q = torch.randn(requests, heads, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    attention = 0.0
    for contexts in decode_steps:
        n = len(contexts)
        lens = torch.tensor(contexts, dtype=torch.int32, device="cuda")
        call = partial(paged_decode_attention, q[:n], cache, tables[:n], lens, head_dim**-0.5,
                       out=out[:n])  # fmt: skip
        attention += graph_seconds([call]) * layers
    return attention


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall-clock seconds, result) of `fn()`, with the device synchronised on both sides."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def free_gpu() -> None:
    """Give back the memory of objects just dropped, so the next model has the card."""
    gc.collect()
    torch.cuda.empty_cache()


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*TOKEN_IDS) for _ in range(length)] for _ in range(count)]


def baton_llm(model_dir: Path, **engine_args: Any) -> Any:
    from engine import LLM

    return LLM(str(model_dir), device="cuda", dtype="bfloat16", **engine_args)


def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return model.cuda().eval()


def hf_generate(model: Any, ids: torch.Tensor, new_tokens: int, cache: str | None) -> torch.Tensor:
    """Greedy `generate` of exactly `new_tokens` per row; `cache` is a cache_implementation."""
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,  # eos is never picked before this many tokens
        "do_sample": False,
        "pad_token_id": 0,
        "eos_token_id": None,
    }
    if cache is not None:
        kwargs["cache_implementation"] = cache
    with torch.inference_mode():
        return model.generate(ids, **kwargs)


# --- decode ----------------------------------------------------------------------------------


def bench_decode(model_dir: Path) -> dict[str, Any]:
    """Batch-1 decode of 256 tokens after a 16-token prompt; tokens/s against the roofline."""
    weights = weight_bytes(model_dir)
    bandwidth = copy_bandwidth()
    free_gpu()
    baton_runs, baton_tokens, sync_runs, first_runs = _baton_decode(model_dir)
    baton_s, sync_s = statistics.median(baton_runs), statistics.median(sync_runs)
    free_gpu()
    hf_s = _hf_decode(model_dir)
    free_gpu()
    roofline = bandwidth / weights
    baton_rate = DECODE_NEW_TOKENS / baton_s
    hf_rate = DECODE_NEW_TOKENS / hf_s
    fraction = baton_rate / roofline
    return {
        "prompt_tokens": len(DECODE_PROMPT),
        "new_tokens": DECODE_NEW_TOKENS,
        "weight_bytes": weights,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": roofline,
        "baton_seconds": baton_s,  # the median run
        "baton_seconds_samples": baton_runs,
        "baton_sync_scheduling_seconds_samples": sync_runs,
        "baton_tokens_per_s": baton_rate,
        "baton_ms_per_token": 1000 * baton_s / DECODE_NEW_TOKENS,
        "baton_output_tokens": baton_tokens,
        "baton_sync_scheduling_tokens_per_s": DECODE_NEW_TOKENS / sync_s,
        # a generate of one token: the 16-token prompt's step and the output's way back
        "baton_first_token_ms": 1000 * statistics.median(first_runs),
        "baton_first_token_ms_samples": [1000 * s for s in first_runs],
        "transformers_seconds": hf_s,
        "transformers_tokens_per_s": hf_rate,
        "transformers_ms_per_token": 1000 * hf_s / DECODE_NEW_TOKENS,
        "baton_fraction_of_roofline": fraction,
        "baton_over_transformers": baton_rate / hf_rate,
        "aim_fraction_of_roofline": AIMS["decode_fraction_of_roofline"],
        "meets_aim": fraction >= AIMS["decode_fraction_of_roofline"],
    }


def _baton_decode(model_dir: Path) -> tuple[list[float], int, list[float], list[float]]:
    """Seconds of BATON_REPEATS timed batch-1 generates after two warm-ups (and one with
    synchronous scheduling), the tokens each generated, the seconds of as many with synchronous
    scheduling (runs alternate), and the seconds of five one-token generates."""
    from engine import SamplingParams

    llm = baton_llm(model_dir, kv_cache_memory_bytes=8 << 30)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for _ in range(2):
        llm.generate([DECODE_PROMPT], warm, use_tqdm=False)
    # the synchronous runs' path too, so that neither kind's first timed run pays a first call
    _synchronous_seconds(llm, lambda: llm.generate([DECODE_PROMPT], warm, use_tqdm=False))
    params = SamplingParams(temperature=0, max_tokens=DECODE_NEW_TOKENS, ignore_eos=True)
    runs, sync_runs, tokens = [], [], 0
    for _ in range(BATON_REPEATS):
        seconds, outputs = timed(lambda: llm.generate([DECODE_PROMPT], params, use_tqdm=False))
        runs.append(seconds)
        tokens = len(outputs[0].outputs[0].token_ids)
        sync_runs.append(
            _synchronous_seconds(
                llm, lambda: llm.generate([DECODE_PROMPT], params, use_tqdm=False)
            )
        )
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    first = [timed(lambda: llm.generate([DECODE_PROMPT], one, use_tqdm=False))[0] for _ in range(5)]
    return runs, tokens, sync_runs, first


def _synchronous_seconds(llm: Any, run: Callable[[], Any]) -> float:
    """`run` with asynchronous scheduling off (every step's tokens read before the next step is
    launched), on the same engine: what the overlap gains."""
    core = llm.engine.core
    was = core.async_scheduling
    core.set_async_scheduling(False)
    try:
        return timed(run)[0]
    finally:
        core.set_async_scheduling(was)


def _hf_decode(model_dir: Path) -> float:
    """Seconds of one timed batch-1 transformers `generate` (dynamic cache), after a warm-up."""
    model = hf_model(model_dir)
    ids = torch.tensor([DECODE_PROMPT], device="cuda")
    hf_generate(model, ids, 8, cache=None)
    seconds, out = timed(lambda: hf_generate(model, ids, DECODE_NEW_TOKENS, cache=None))
    assert out.shape[1] - ids.shape[1] == DECODE_NEW_TOKENS, out.shape
    return seconds


# --- concurrent ------------------------------------------------------------------------------


def bench_concurrent(model_dir: Path) -> dict[str, Any]:
    """128 requests submitted at once: output tokens/s of Baton against transformers."""
    prompts = random_prompts(CONCURRENT_REQUESTS, CONCURRENT_PROMPT_TOKENS, seed=0)
    total = CONCURRENT_REQUESTS * CONCURRENT_NEW_TOKENS
    baton_runs, baton_tokens, sync_runs = _baton_concurrent(model_dir, prompts)
    baton_s, sync_s = statistics.median(baton_runs), statistics.median(sync_runs)
    free_gpu()
    hf = _hf_concurrent(model_dir, prompts)
    free_gpu()
    baton_rate = total / baton_s
    hf_rate = total / hf["transformers_seconds"]
    ratio = baton_rate / hf_rate
    bandwidth, flops = copy_bandwidth(), matmul_flops()
    free_gpu()
    bound = concurrent_bound(
        SHAPE, CONCURRENT_REQUESTS, CONCURRENT_PROMPT_TOKENS, CONCURRENT_NEW_TOKENS, bandwidth,
        flops,
    )  # fmt: skip
    kernels = concurrent_kernel_bound(
        SHAPE, CONCURRENT_REQUESTS, CONCURRENT_PROMPT_TOKENS, CONCURRENT_NEW_TOKENS, CHUNK_TOKENS
    )
    free_gpu()
    aim = AIMS["concurrent_baton_over_transformers"]
    return {
        "requests": CONCURRENT_REQUESTS,
        "prompt_tokens": CONCURRENT_PROMPT_TOKENS,
        "new_tokens": CONCURRENT_NEW_TOKENS,
        "baton_engine_args": {
            "max_num_seqs": CONCURRENT_REQUESTS,
            "max_num_batched_tokens": CHUNK_TOKENS,
            "kv_cache_memory_bytes": 8 << 30,
        },
        "baton_seconds": baton_s,  # the median run
        "baton_seconds_samples": baton_runs,
        "baton_sync_scheduling_seconds_samples": sync_runs,
        "baton_output_tokens": baton_tokens,
        "baton_output_tokens_per_s": baton_rate,
        "baton_sync_scheduling_output_tokens_per_s": total / sync_s,
        **hf,
        "transformers_output_tokens_per_s": hf_rate,
        "baton_over_transformers": ratio,
        "aim_baton_over_transformers": aim,
        "meets_aim": ratio >= aim,
        # The hardware's floor for this work (`concurrent_bound`) and how near each engine is:
        # the aim asks Baton for `aim_needs_fraction_of_bound` of it.
        "copy_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops,
        "bound": bound,
        "baton_fraction_of_bound": bound["seconds"] / baton_s,
        "transformers_fraction_of_bound": bound["seconds"] / hf["transformers_seconds"],
        "aim_needs_fraction_of_bound": aim * bound["seconds"] / hf["transformers_seconds"],
        # With cuBLAS's GEMMs and the decode attention kernel as they run here, and nothing
        # else: the most this engine could reach over transformers without faster kernels.
        "kernel_bound": kernels,
        "kernel_bound_over_transformers": hf["transformers_seconds"] / kernels["seconds"],
    }


def _baton_concurrent(
    model_dir: Path, prompts: list[list[int]]
) -> tuple[list[float], int, list[float]]:
    """Seconds of BATON_REPEATS timed `generate`s of all the requests (the first over
    `prompts`) after a same-shape warm-up (and one with synchronous scheduling), the output
    tokens of one, and the seconds of as many with synchronous scheduling (runs alternate)."""
    from engine import SamplingParams

    llm = baton_llm(
        model_dir,
        max_num_seqs=CONCURRENT_REQUESTS,
        max_num_batched_tokens=CHUNK_TOKENS,
        kv_cache_memory_bytes=8 << 30,
    )
    # The timed run's shape with distinct prompts (another seed: no prefix-cache hits), so every
    # Triton specialisation it needs is compiled beforehand (as transformers' warm-up is the
    # timed call itself).
    warm_prompts = random_prompts(CONCURRENT_REQUESTS, CONCURRENT_PROMPT_TOKENS, seed=1)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(warm_prompts, warm, use_tqdm=False)
    sync_warm = random_prompts(CONCURRENT_REQUESTS, CONCURRENT_PROMPT_TOKENS, seed=2)
    _synchronous_seconds(llm, partial(llm.generate, sync_warm, warm, use_tqdm=False))
    params = SamplingParams(temperature=0, max_tokens=CONCURRENT_NEW_TOKENS, ignore_eos=True)
    runs, sync_runs, tokens = [], [], 0
    for i in range(BATON_REPEATS):  # each run with prompts of its own: no prefix-cache hits
        batch = prompts if i == 0 else random_prompts(len(prompts), len(prompts[0]), seed=10 + i)
        seconds, outputs = timed(partial(llm.generate, batch, params, use_tqdm=False))
        runs.append(seconds)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        others = random_prompts(len(prompts), len(prompts[0]), seed=20 + i)
        sync_runs.append(
            _synchronous_seconds(llm, partial(llm.generate, others, params, use_tqdm=False))
        )
    return runs, tokens, sync_runs


def _hf_concurrent(model_dir: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """transformers `generate` over the (128, 512) batch: static cache, else the dynamic one.

    The warm-up has the timed call's shapes (static cache length included), so torch.compile,
    which transformers applies to static-cache decoding, does not recompile in the timed call.
    """
    model = hf_model(model_dir)
    ids = torch.tensor(prompts, device="cuda")
    result: dict[str, Any] = {"transformers_cache": "static", "transformers_static_error": None}
    try:
        hf_generate(model, ids, CONCURRENT_NEW_TOKENS, cache="static")
        seconds, out = timed(lambda: hf_generate(model, ids, CONCURRENT_NEW_TOKENS, "static"))
    except Exception as e:
        traceback.print_exc()
        result = {"transformers_cache": "dynamic", "transformers_static_error": repr(e)}
        free_gpu()
        hf_generate(model, ids, 8, cache=None)
        seconds, out = timed(lambda: hf_generate(model, ids, CONCURRENT_NEW_TOKENS, None))
    result["transformers_seconds"] = seconds
    result["transformers_output_tokens"] = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return result


# --- prefill ---------------------------------------------------------------------------------


def bench_prefill(model_dir: Path) -> dict[str, Any]:
    """Seconds to process one 8,192-token prompt (median of 5, each a fresh random prompt)."""
    prompts = random_prompts(PREFILL_WARMUPS + PREFILL_RUNS, PREFILL_TOKENS, seed=2)
    baton = _baton_prefill(model_dir, prompts)
    free_gpu()
    hf = _hf_prefill(model_dir, prompts)
    free_gpu()
    baton_s = statistics.median(baton)
    hf_s = statistics.median(hf["runs"])
    ratio = baton_s / hf_s
    return {
        "prompt_tokens": PREFILL_TOKENS,
        "warmups": PREFILL_WARMUPS,
        "runs": PREFILL_RUNS,
        "baton_seconds_runs": baton,
        "baton_seconds_median": baton_s,
        "baton_prompt_tokens_per_s": PREFILL_TOKENS / baton_s,
        "transformers_seconds_runs": hf["runs"],
        "transformers_seconds_median": hf_s,
        "transformers_prompt_tokens_per_s": PREFILL_TOKENS / hf_s,
        "transformers_logits_to_keep": hf["logits_to_keep"],
        "baton_over_transformers": ratio,
        "aim_baton_over_transformers_at_most": AIMS["prefill_baton_over_transformers"],
        "meets_aim": ratio <= AIMS["prefill_baton_over_transformers"],
    }


def _baton_prefill(model_dir: Path, prompts: list[list[int]]) -> list[float]:
    """Seconds of each timed prompt (after the warm-ups): a generate of one token each."""
    from engine import SamplingParams

    llm = baton_llm(
        model_dir,
        max_num_batched_tokens=PREFILL_TOKENS,
        kv_cache_memory_bytes=2 << 30,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    runs = [timed(partial(llm.generate, [p], params, use_tqdm=False))[0] for p in prompts]
    return runs[PREFILL_WARMUPS:]


def _hf_prefill(model_dir: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """Seconds of each timed forward pass over one prompt, and whether logits_to_keep worked."""
    model = hf_model(model_dir)
    keep: dict[str, Any] = {"logits_to_keep": 1}

    def forward(prompt: list[int]) -> Any:
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            return model(ids, **keep)

    try:
        forward(prompts[0][:16])
    except TypeError:
        keep = {}
    runs = [timed(partial(forward, p))[0] for p in prompts]
    return {"runs": runs[PREFILL_WARMUPS:], "logits_to_keep": bool(keep)}


# --- driver ----------------------------------------------------------------------------------

BENCHMARKS: dict[str, Section] = {
    "decode": bench_decode,
    "concurrent": bench_concurrent,
    "prefill": bench_prefill,
}


def parse_sections(text: str) -> list[str]:
    """`decode,prefill` -> the named sections, in the order given; unknown names are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(SECTIONS)}"
        )
    return list(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--only",
        type=parse_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_engine.json"))
    return parser.parse_args(argv)


def run_section(name: str, section: Section, model_dir: Path) -> dict[str, Any]:
    """One benchmark's result, or `{"error": ...}` if it raised (its traceback is printed)."""
    print(f"[gpu_engine] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        result = section(model_dir)
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    free_gpu()
    result["wall_seconds"] = time.perf_counter() - start
    print(f"[gpu_engine] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def write_result(result: dict[str, Any], out: Path) -> None:
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_engine needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        result: dict[str, Any] = {
            "benchmark": "gpu_engine",
            "model": {"shape": SHAPE, "dtype": "bfloat16", "weight_bytes": weight_bytes(model_dir)},
            "gpu": torch.cuda.get_device_name(),
            "machine": describe_machine(),
            "code": git_commit(),
            "command": " ".join(["python -m bench.gpu_engine", *words]),
        }
        for name in args.only:
            result[name] = run_section(name, BENCHMARKS[name], model_dir)
    write_result(result, args.out)


if __name__ == "__main__":
    main()
