"""Structured outputs' cost against the same requests unconstrained, in one run on one engine.

    per token  32 requests at once, a fixed number of output tokens each (eos ignored), once
               unconstrained and once held to SCHEMA; the decode window's seconds (from the last
               request's first token to the last token, bench.decode_window) over the tokens
               generated in it. Greedy, then temperature 1. The grammar is compiled (and cached)
               in a warm-up first; runs alternate, and the fastest of --repeats of each kind
               counts: by process CPU time on the CPU (a shared machine: others' load moves wall
               time far more), by wall time on the GPU (BASIS); both ratios are recorded. On
               the CPU torch runs on one thread (--threads): with two, a thread waiting at an
               op's barrier for its descheduled partner spins, and the CPU clock counts the
               spinning. The CPU ratio is one of work: where the model's work is spread over k
               cores and the grammar's is not, the grammar's share of wall time is up to k times
               its share of work.
    TTFT       one request, batch 1, one output token: unconstrained; with a grammar not seen
               before (SCHEMA with one property renamed per run: a compile-cache miss); with that
               grammar again (a hit). Medians of --ttft-repeats, wall ms and the request's
               process CPU ms.
    mask fill  the grammar backend filling one row's allowed-token mask, timed token by token
               along a fixed prefix of an answer (host ms), for SCHEMA and for SCHEMA without
               the strings' maxLength: what a step pays per structured row before sampling.

SCHEMA is an array of at least 64 person objects (bench.structured.PERSON_SCHEMA), compact
(`disable_any_whitespace`), so no answer ends within the run and both kinds generate the same
number of tokens. The engine core's step counters, run by run, say how many steps were launched
ahead of the previous one's tokens (`num_chained_steps`) and how many scheduled ahead could not
be (`num_deferred_steps`); a batch whose steps cannot be launched ahead at all counts neither
(each step runs to completion). Asynchronous scheduling is on by default with CUDA graphs only.

    --device cpu --model demo   the demo model (SmolLM2-135M-Instruct), float32, text prompts
    --device cuda --model 1b    bench.gpu_engine's random Llama-3.2-1B shape, bfloat16, random
                                token-id prompts, with bench.byte_level_tokenizer's vocabulary

    python -m bench.structured_outputs [--device cpu|cuda] [--model demo|1b|DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.decode_window import decode_run
from bench.machine import describe_machine, git_commit, load_average
from bench.structured import PERSON_SCHEMA

SCHEMA: dict[str, Any] = {"type": "array", "items": PERSON_SCHEMA, "minItems": 64}
# Per-output-token overhead of the constrained run over the unconstrained one, at most.
AIMS = {"cpu": 0.10, "cuda": 0.05}
# What the per-token ratio is of (bench.decode_window): on a shared CPU the process's CPU time,
# which the other processes' load moves far less than the wall clock; on a GPU the wall clock.
BASIS = {"cpu": "cpu_ms_per_token", "cuda": "ms_per_token"}
DEFAULTS = {  # device -> (decode steps, repeats, TTFT repeats)
    "cpu": (16, 5, 5),
    "cuda": (128, 3, 5),
}
BATCH = 32
GPU_PROMPT_TOKENS = 64
# A prefix of an answer of SCHEMA, along which the grammar's mask is filled and timed.
MASK_DOCUMENT = (
    '[{"name": "Ada Lovelace", "age": 36, "city": "London", "id": 7}, '
    '{"name": "Grace Hopper", "age": 85, "city": "Arlington", "id": 8}, {"name": "Al'
)
TOPICS = ("engineers", "painters", "pilots", "doctors", "chefs", "teachers", "farmers", "poets")


@dataclass(slots=True)
class Setup:
    """The engine under test, its prompts (token ids) and what the result records of them."""

    llm: Any
    prompts: list[list[int]]
    model: dict[str, Any]
    engine_args: dict[str, Any] = field(default_factory=dict)


def constraint(tag: str = "", bounded: bool = True) -> Any:
    """SCHEMA as StructuredOutputsParams; a `tag` renames the `id` property to `id_<tag>`, a
    schema no earlier request had; `bounded=False` drops the strings' maxLength."""
    from engine import StructuredOutputsParams

    item = json.loads(json.dumps(PERSON_SCHEMA))
    if tag:
        item["properties"][f"id_{tag}"] = item["properties"].pop("id")
        item["required"] = [f"id_{tag}" if n == "id" else n for n in item["required"]]
    if not bounded:
        for prop in item["properties"].values():
            prop.pop("maxLength", None)
    return StructuredOutputsParams(json={**SCHEMA, "items": item}, disable_any_whitespace=True)


def demo_setup(device: str, model_dir: Path | None) -> Setup:
    """The demo model (or `model_dir`) in float32; 32 prompts asking for people as JSON (plain
    text, no chat template: short, so that the untimed prefills take little of the run)."""
    from engine import LLM
    from engine.models.demo import ensure_demo_model

    model_dir = model_dir or ensure_demo_model(progress=False)
    args = {"dtype": "float32", "max_num_seqs": BATCH, "max_num_batched_tokens": 4096,
            "enable_prefix_caching": False}  # fmt: skip
    llm = LLM(str(model_dir), device=device, **args)
    prompts = []
    for i in range(BATCH):
        ask = (f"List {3 + i // len(TOPICS)} {TOPICS[i % len(TOPICS)]} as a JSON array of "
               "objects with name, age, city and id.")  # fmt: skip
        prompts.append(llm.get_tokenizer().encode(ask, add_special_tokens=False))
    return Setup(llm, prompts, {"name": model_dir.name, "dtype": "float32"}, args)


def gpu_setup(directory: Path) -> Setup:
    """bench.gpu_engine's random 1B shape (bf16) with a byte-level vocabulary; random prompts."""
    from bench.byte_level_tokenizer import write_byte_level_tokenizer
    from bench.gpu_engine import SHAPE, baton_llm, make_model, random_prompts

    model_dir = make_model(directory, tokenizer=write_byte_level_tokenizer)
    args = {"max_num_seqs": BATCH, "max_num_batched_tokens": 8192,
            "kv_cache_memory_bytes": 8 << 30, "enable_prefix_caching": False}  # fmt: skip
    llm = baton_llm(model_dir, **args)
    model = {"name": "random Llama-3.2-1B shape", "shape": SHAPE, "dtype": "bfloat16",
             "tokenizer": "bench.byte_level_tokenizer"}  # fmt: skip
    return Setup(llm, random_prompts(BATCH, GPU_PROMPT_TOKENS, seed=0), model, args)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_token_pair(
    setup: Setup, temperature: float, steps: int, repeats: int, device: str
) -> dict[str, Any]:
    """`repeats` alternating runs of the batch unconstrained and constrained; the fastest of
    each kind by the device's measure (BASIS), their per-token ratio, the ratio of the medians,
    and the ratio by the other measure too."""
    from engine import SamplingParams

    def params(structured: Any) -> Any:
        return SamplingParams(temperature=temperature, max_tokens=steps, ignore_eos=True,
                              structured_outputs=structured)  # fmt: skip

    kinds = {"plain": params(None), "structured": params(constraint())}
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "structured": []}
    for _ in range(repeats):
        for name, p in kinds.items():
            runs[name].append(decode_run(setup.llm, setup.prompts, p))
    key = BASIS[device]
    best = {name: min(rs, key=lambda r: r[key]) for name, rs in runs.items()}
    ratio, of_medians = _ratios(runs, key)
    samples = ("ms_per_token", "cpu_ms_per_token", "chained_steps", "deferred_steps")
    return {
        "temperature": temperature,
        **{
            name: {**best[name], **{f"{k}_samples": [r[k] for r in rs] for k in samples}}
            for name, rs in runs.items()
        },
        "same_token_counts": best["plain"]["output_tokens"] == best["structured"]["output_tokens"],
        "basis": key,
        "ratio": ratio,
        "overhead": ratio - 1,
        "ratio_of_medians": of_medians,
        "wall_ratio": _ratios(runs, "ms_per_token")[0],
        "cpu_ratio": _ratios(runs, "cpu_ms_per_token")[0],
        "aim_overhead_at_most": AIMS[device],
        "meets_aim": ratio - 1 <= AIMS[device],
    }


def _ratios(runs: dict[str, list[dict[str, Any]]], key: str) -> tuple[float, float]:
    """structured / plain by `key`: of the fastest runs, and of the medians."""
    best = {name: min(r[key] for r in rs) for name, rs in runs.items()}
    median = {name: statistics.median(r[key] for r in rs) for name, rs in runs.items()}
    return best["structured"] / best["plain"], median["structured"] / median["plain"]


def ttft_ms(llm: Any, prompt: list[int], structured: Any, device: str) -> tuple[float, float]:
    """Milliseconds from the request's arrival to its first token (one output token), and the
    process CPU milliseconds of the whole request (a compile on its thread included)."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=structured)
    _sync(device)
    cpu = time.process_time()
    [out] = llm.generate([prompt], params, use_tqdm=False)
    cpu = time.process_time() - cpu
    return 1000 * (out.metrics.first_token_time - out.metrics.arrival_time), 1000 * cpu


def ttft_section(setup: Setup, repeats: int, device: str) -> dict[str, Any]:
    """Batch-1 TTFT unconstrained, with a grammar never seen (a compile-cache miss) and with
    that grammar cached (wall ms, and the request's process CPU ms)."""
    llm, prompt = setup.llm, setup.prompts[0]
    stats = llm.engine.core.structured.compiler.stats
    wall: dict[str, list[float]] = {"plain": [], "cold": [], "cached": []}
    cpu: dict[str, list[float]] = {"plain": [], "cold": [], "cached": []}
    misses, hits, compile_ms = stats.misses, stats.hits, []
    for i in range(repeats):
        so = constraint(f"r{i}_{time.monotonic_ns()}")
        for name, structured in (("plain", None), ("cold", so), ("cached", so)):
            before = stats.compile_seconds
            ms, cpu_ms = ttft_ms(llm, prompt, structured, device)
            wall[name].append(ms)
            cpu[name].append(cpu_ms)
            if name == "cold":
                compile_ms.append(1000 * (stats.compile_seconds - before))
    med = {name: statistics.median(s) for name, s in wall.items()}
    med_cpu = {name: statistics.median(s) for name, s in cpu.items()}
    return {
        "prompt_tokens": len(prompt),
        **{f"{name}_ms": med[name] for name in wall},
        **{f"{name}_cpu_ms": med_cpu[name] for name in cpu},
        **{f"{name}_ms_samples": s for name, s in wall.items()},
        **{f"{name}_cpu_ms_samples": s for name, s in cpu.items()},
        "cold_over_plain": med["cold"] / med["plain"],
        "cached_over_plain": med["cached"] / med["plain"],
        "cold_over_plain_cpu": med_cpu["cold"] / med_cpu["plain"],
        "cached_over_plain_cpu": med_cpu["cached"] / med_cpu["plain"],
        "compile_ms_samples": compile_ms,
        "cache_misses": stats.misses - misses,  # one per cold request
        "cache_hits": stats.hits - hits,  # one per cached request
    }


def mask_section(llm: Any) -> dict[str, Any]:
    """Host milliseconds of the grammar backend's mask fill for one row, token by token along
    MASK_DOCUMENT: SCHEMA, and SCHEMA with unbounded strings (no maxLength). Per-token overhead
    at batch B is about B such fills a step, besides applying the masks and sampling."""
    from engine.structured.bitmask import allocate_bitmask

    compiler = llm.engine.core.structured.compiler
    ids = llm.get_tokenizer().encode(MASK_DOCUMENT, add_special_tokens=False)
    bitmask = allocate_bitmask(1, llm.engine.config.model.vocab_size)
    result: dict[str, Any] = {"document": MASK_DOCUMENT, "document_tokens": len(ids)}
    for name, bounded in (("schema", True), ("unbounded_strings", False)):
        matcher = compiler.backends.compile(compiler.backend, constraint(bounded=bounded)).matcher()
        times = []
        for token in ids:
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            times.append(1000 * (time.perf_counter() - start))
            assert matcher.accept_token(token), f"{name}: the grammar refused token {token}"
        result[name] = {"mean_ms": statistics.mean(times), "median_ms": statistics.median(times),
                        "max_ms": max(times)}  # fmt: skip
    result["schema_over_unbounded"] = (
        result["schema"]["mean_ms"] / result["unbounded_strings"]["mean_ms"]
    )
    return result


def warm_up(setup: Setup, device: str) -> dict[str, Any]:
    """The first structured request (the backend is built over the tokenizer, SCHEMA
    compiled), then a short greedy batch of each kind; what it took. (The first run of each
    kind at temperature 1 may pay a first call: the fastest run counts.)"""
    from engine import SamplingParams

    first, _ = ttft_ms(setup.llm, setup.prompts[0], constraint(), device)
    for structured in (None, constraint()):
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                structured_outputs=structured)  # fmt: skip
        setup.llm.generate(setup.prompts, params, use_tqdm=False)
    compiler = setup.llm.engine.core.structured.compiler
    backend = next(iter(compiler._cache.values())).backend
    return {"first_structured_request_ttft_ms": first, "backend": backend}


def _defaults(i: int) -> str:
    return ", ".join(f"{device} {values[i]}" for device, values in DEFAULTS.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module's docstring); unset counts take the device's defaults."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default=None, metavar="demo|1b|DIR",
                        help="default: demo on cpu, 1b on cuda; DIR: a model directory, run as "
                        "the demo model is")  # fmt: skip
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=None,
        help=f"output tokens per request ({_defaults(0)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs of each kind per temperature ({_defaults(1)})",
    )
    parser.add_argument("--ttft-repeats", type=int, default=None, help=_defaults(2))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: 1 on cpu, torch's own on cuda)")  # fmt: skip
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/structured_outputs_DEVICE.json",
    )
    args = parser.parse_args(argv)
    steps, repeats, ttft_repeats = DEFAULTS[args.device]
    args.model = args.model or ("1b" if args.device == "cuda" else "demo")
    args.decode_steps = args.decode_steps or steps
    args.repeats = args.repeats or repeats
    args.ttft_repeats = args.ttft_repeats or ttft_repeats
    args.out = args.out or Path(f"bench/results/structured_outputs_{args.device}.json")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    return args


def measure(setup: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, the mask fill alone, TTFT, then the per-token pairs (greedy, temperature 1)."""
    start = time.perf_counter()

    def log(text: str) -> None:
        elapsed = time.perf_counter() - start
        print(f"[structured_outputs {elapsed:6.1f} s] {text}", file=sys.stderr, flush=True)

    log("warm-up")
    warm = warm_up(setup, args.device)
    log("mask fill")
    mask = mask_section(setup.llm)
    log("ttft")
    ttft = ttft_section(setup, args.ttft_repeats, args.device)
    pairs = {}
    for name, temperature in (("greedy", 0.0), ("temperature_1", 1.0)):
        log(f"per token, {name}")
        pairs[name] = per_token_pair(
            setup, temperature, args.decode_steps, args.repeats, args.device
        )
    core = setup.llm.engine.core
    chained = pairs["greedy"]["structured"]["chained_steps"]
    return {
        "warm_up": warm,
        "per_token": pairs,
        "ttft": ttft,
        "mask_fill": mask,
        "async_scheduling": {
            "on": core.async_scheduling,
            # the aim on the GPU: greedy structured steps are launched ahead too
            "kept_for_structured_greedy": chained > 0 if core.async_scheduling else None,
            # of the greedy structured run that counts (others per run in the samples)
            "structured_greedy_chained_steps": chained,
            "structured_greedy_deferred_steps": pairs["greedy"]["structured"]["deferred_steps"],
            "plain_greedy_chained_steps": pairs["greedy"]["plain"]["chained_steps"],
        },
    }


def _lengths(prompts: list[list[int]]) -> dict[str, float]:
    lengths = [len(p) for p in prompts]
    return {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)}


def build(args: argparse.Namespace, scratch: Path) -> Setup:
    if args.model == "1b":
        if args.device != "cuda":
            raise SystemExit("--model 1b runs on --device cuda")
        return gpu_setup(scratch)
    model_dir = None if args.model == "demo" else Path(args.model)
    return demo_setup(args.device, model_dir)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    words = sys.argv[1:] if argv is None else argv
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    load_at_start = load_average()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        setup = build(args, Path(scratch))
        measured = measure(setup, args)
    greedy = measured["per_token"]["greedy"]
    result = {
        "benchmark": "structured_outputs",
        "device": args.device,
        "model": setup.model,
        "engine_args": setup.engine_args,
        "schema": SCHEMA,
        "disable_any_whitespace": True,
        "workload": {
            "batch": BATCH,
            "prompt_tokens": _lengths(setup.prompts),
            "decode_steps": args.decode_steps,
            "repeats": args.repeats,
            "ttft_repeats": args.ttft_repeats,
        },
        "summary": {
            "basis": greedy["basis"],
            "greedy_overhead": greedy["overhead"],
            "temperature_1_overhead": measured["per_token"]["temperature_1"]["overhead"],
            "aim_overhead_at_most": AIMS[args.device],
            "meets_aim": greedy["meets_aim"],
            "async_scheduling_kept": measured["async_scheduling"]["kept_for_structured_greedy"],
            "ttft_plain_ms": measured["ttft"]["plain_ms"],
            "ttft_cold_ms": measured["ttft"]["cold_ms"],
            "ttft_cached_ms": measured["ttft"]["cached_ms"],
            "ttft_plain_cpu_ms": measured["ttft"]["plain_cpu_ms"],
            "ttft_cold_cpu_ms": measured["ttft"]["cold_cpu_ms"],
            "ttft_cached_cpu_ms": measured["ttft"]["cached_cpu_ms"],
            "mask_fill_ms_per_row": measured["mask_fill"]["schema"]["mean_ms"],
            "mask_fill_ms_per_row_unbounded_strings": (
                measured["mask_fill"]["unbounded_strings"]["mean_ms"]
            ),
        },
        **measured,
        "machine": {**describe_machine(), "load_average_at_start": load_at_start},
        "code": git_commit(),
        "command": shlex.join(["python", "-m", "bench.structured_outputs", *words]),
    }
    text = json.dumps(result, indent=2) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
