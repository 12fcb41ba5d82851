"""The engine's command-line flags, named as vLLM's, defined once (`ENGINE_FLAGS`).

Every worker parses them (`add_worker_args`), `baton serve` takes them and forwards the ones
the user set to its workers (`engine_cli_args`), and `baton generate` builds its `LLM` from them
(`engine_kwargs`: the names are `LLMEngine.from_args`'s). torch is imported only to build an
engine, so the `baton` CLI can import this module and stay fast.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.core import EngineCore

MODEL, CACHE, SCHEDULER, KERNELS = "model", "KV cache", "scheduler", "kernels"
STRUCTURED, SPECULATIVE = "structured outputs", "speculative decoding"
GROUP_HELP = {
    MODEL: "the model, its context and numerics",
    CACHE: "the paged KV cache and its prefix cache",
    SCHEDULER: "continuous batching: per-step limits and admission",
    KERNELS: "the layers' kernels (engine.config.KernelConfig); the fusions are on by default "
    "and there to measure",
    STRUCTURED: "grammar backends for structured outputs (engine.structured)",
    SPECULATIVE: "drafts verified by the model in one pass (engine.spec_decode)",
}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
SCHEDULING_POLICIES = ("fcfs", "priority", "fair")
KERNEL_BACKENDS = ("auto", "triton", "torch")  # engine.config's, without importing torch
_BYTE_UNITS = {
    "": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """Parse a byte count such as `1073741824`, `512MiB`, `2G` or `1.5GB` into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (try 512MiB or 2G)")
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[unit or ""])


def parse_seconds(text: str) -> float:
    """Parse a positive number of seconds such as `30` or `0.5`."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"not a number of seconds > 0: {text!r}")
    return seconds


def parse_structured_outputs_config(text: str) -> str:
    """vLLM's `--structured-outputs-config` JSON, checked (known keys, a registered backend)
    and returned as compact JSON."""
    import json

    from engine.structured.backend_choice import parse_backend_choice

    try:
        return json.dumps(parse_backend_choice(text), separators=(",", ":"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_speculative_config(text: str) -> str:
    """vLLM's `--speculative-config` JSON, checked (engine.config.SpeculativeConfig) and
    returned as compact JSON."""
    import json

    from engine.config import SpeculativeConfig

    try:
        config = SpeculativeConfig.from_value(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    assert config is not None
    return json.dumps(config.to_dict(), separators=(",", ":"))


class BackendNames(Collection[str]):
    """The registered structured-outputs backends and `auto`, looked up whenever argparse asks
    (its `choices`): a backend registered at runtime is a valid choice."""

    def _names(self) -> list[str]:
        from engine.structured.registry import backend_names

        return backend_names()

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


@dataclass(frozen=True, slots=True)
class EngineFlag:
    """One engine flag, `--NAME` with NAME's `_` as `-`; `type` None is a boolean, spelled
    `--NAME` / `--no-NAME` (argparse's BooleanOptionalAction, as vLLM's)."""

    name: str
    group: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: Collection[str] | None = None
    metavar: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def cli_args(self, value: Any) -> list[str]:
        """The command-line words that set this flag to `value`."""
        if self.type is None:
            return [self.option if value else "--no-" + self.option[2:]]
        return [self.option, str(value)]


ENGINE_FLAGS = (
    EngineFlag("served_model_name", MODEL, None,
               "the model's name in the API and in block hashes (default: the directory's name)",
               str, metavar="NAME"),
    EngineFlag("dtype", MODEL, "auto", "weight and activation dtype; auto: the model config's",
               str, DTYPES),
    EngineFlag("max_model_len", MODEL, None,
               "context length in tokens (default: the model config's)", int, metavar="TOKENS"),
    EngineFlag("seed", MODEL, 0, "seed of the engine's random sampling", int, metavar="N"),
    EngineFlag("enforce_eager", MODEL, False, "GPU: run every step eagerly, no CUDA graphs"),
    EngineFlag("block_size", CACHE, 16, "tokens per KV cache block", int, metavar="TOKENS"),
    EngineFlag("gpu_memory_utilization", CACHE, 0.9,
               "GPU: the share of its memory the weights and KV cache may take", float,
               metavar="FRACTION"),
    EngineFlag("kv_cache_memory_bytes", CACHE, None,
               "KV cache size, e.g. 512MiB or 2G (default: 1 GiB on CPU, "
               "--gpu-memory-utilization on a GPU)", parse_bytes, metavar="BYTES"),
    EngineFlag("num_kv_blocks", CACHE, None,
               "KV cache size in blocks (overrides the size in bytes)", int, metavar="N"),
    EngineFlag("enable_prefix_caching", CACHE, True, "reuse the KV of cached prompt prefixes"),
    EngineFlag("max_num_seqs", SCHEDULER, 64, "most sequences in one batch", int, metavar="N"),
    EngineFlag("max_num_batched_tokens", SCHEDULER, 2048,
               "most tokens in one forward pass (the chunked-prefill budget)", int, metavar="N"),
    EngineFlag("max_num_waiting", SCHEDULER, None,
               "refuse new requests beyond N waiting ones (default: no limit)", int, metavar="N"),
    EngineFlag("scheduling_policy", SCHEDULER, "fcfs",
               "admission order: first come first served, by request priority, or fair "
               "between tenants", str, SCHEDULING_POLICIES),
    EngineFlag("async_scheduling", SCHEDULER, None,
               "launch a greedy decode step before reading the previous one's tokens "
               "(default: on with CUDA graphs)"),
    EngineFlag("kernel_backend", KERNELS, "auto",
               "Triton kernels (GPU) or the torch reference; auto: Triton on CUDA when triton "
               "is installed", str, KERNEL_BACKENDS),
    EngineFlag("fuse_gate_up", KERNELS, True,
               "Triton: a one-token step's gate/up projection and SwiGLU activation in one "
               "kernel"),
    EngineFlag("fold_norms", KERNELS, True,
               "Triton, half precision: RMSNorm weights folded into the projections, so a "
               "one-token step runs its norms and residual adds inside the GEMVs"),
    EngineFlag("pdl", KERNELS, True,
               "Triton on Hopper or later: programmatic dependent launch"),
    EngineFlag("structured_outputs_backend", STRUCTURED, "auto",
               "the grammar backend; auto: xgrammar, and what it cannot compile goes to "
               "guidance (then outlines, where registered)", str, BackendNames()),
    EngineFlag("structured_outputs_disable_fallback", STRUCTURED, False,
               "under auto, xgrammar alone: its error is the request's (a backend named "
               "explicitly never falls back)"),
    EngineFlag("structured_outputs_compile_timeout", STRUCTURED, 30.0,
               "a request whose grammar has not compiled this long after it arrived ends with "
               "an error naming its constraint (HTTP 400)", parse_seconds, metavar="SECONDS"),
    EngineFlag("structured_outputs_config", STRUCTURED, None,
               'vLLM\'s JSON form of the backend flags, e.g. \'{"backend": "xgrammar", '
               '"disable_fallback": true}\'', parse_structured_outputs_config, metavar="JSON"),
    EngineFlag("speculative_config", SPECULATIVE, None,
               'vLLM\'s speculative_config as JSON, e.g. \'{"method": "ngram", '
               '"num_speculative_tokens": 3, "prompt_lookup_max": 4}\'',
               parse_speculative_config, metavar="JSON"),
)  # fmt: skip


def add_engine_args(
    parser: argparse.ArgumentParser,
    groups: dict[str, Any] | None = None,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """Add `ENGINE_FLAGS` (except those named in `skip`) in their help groups; `groups` may
    hold groups made already (e.g. a "model" group with --model). Returns every group."""
    groups = dict(groups or {})
    for flag in ENGINE_FLAGS:
        if flag.name in skip:
            continue
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group, GROUP_HELP[flag.group])
        kwargs: dict[str, Any] = {"default": flag.default, "help": _help(flag)}
        if flag.type is None:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=flag.type, choices=flag.choices, metavar=flag.metavar)
        groups[flag.group].add_argument(flag.option, **kwargs)
    return groups


def _help(flag: EngineFlag) -> str:
    if flag.default is None or "default:" in flag.help:
        return flag.help
    if flag.type is None:
        return f"{flag.help} (default: {'on' if flag.default else 'off'})"
    return f"{flag.help} (default: %(default)s)"


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed engine flags as `LLM(...)` / `LLMEngine.from_args` keyword arguments."""
    return {f.name: getattr(args, f.name) for f in ENGINE_FLAGS if hasattr(args, f.name)}


def engine_cli_args(args: argparse.Namespace) -> list[str]:
    """The engine flags the user set (those not at their default), as worker command-line
    words; the others keep the worker's own defaults, which are the same."""
    words: list[str] = []
    for flag in ENGINE_FLAGS:
        value = getattr(args, flag.name, flag.default)
        if value != flag.default:
            words += flag.cli_args(value)
    return words


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The flags every worker takes: the model, `ENGINE_FLAGS`, and its placement."""
    model = parser.add_argument_group(MODEL, GROUP_HELP[MODEL])
    model.add_argument("--model", required=True, help="local Hugging Face model directory")
    add_engine_args(parser, {MODEL: model})
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core)",
    )


def add_index_args(parser: argparse.ArgumentParser) -> None:
    """Where the worker publishes its KV events (the prefix index); neither flag: nowhere."""
    parser.add_argument("--index-redis-url", default=None, help="redis:// or rediss:// URL")
    parser.add_argument(
        "--index-router",
        nargs="*",
        default=None,
        metavar="ADDR",
        help="routers' gRPC addresses (their in-process index)",
    )
    parser.add_argument("--cluster-name", default="default", help="Redis key namespace part")
    parser.add_argument("--worker-id", default=None, help="default: HOST:PORT of this worker")
    parser.add_argument(
        "--index-ttl", type=float, default=10.0, metavar="S",
        help="heartbeat TTL of this worker's index entries, in seconds (default: %(default)s)",
    )  # fmt: skip


def publishes_kv_events(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "index_redis_url", None) or getattr(args, "index_router", None))


def build_engine_core(args: argparse.Namespace) -> EngineCore:
    """An EngineCore from parsed `add_worker_args` flags (KV events on: the index reads them)."""
    import torch

    from engine.core import EngineCore

    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    return EngineCore(engine_config(args))


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig that parsed `add_worker_args` flags describe."""
    import torch

    from engine.config import (
        CacheConfig,
        EngineConfig,
        KernelConfig,
        ModelConfig,
        SchedulerConfig,
        SpeculativeConfig,
        StructuredOutputsConfig,
    )

    return EngineConfig(
        model=ModelConfig.from_pretrained(
            args.model, args.dtype, args.max_model_len, args.served_model_name
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
            enable_kv_events=publishes_kv_events(args),
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            policy=args.scheduling_policy,
            max_num_waiting=args.max_num_waiting,
        ),
        device=torch.device(args.device),
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
        kernels=KernelConfig(args.kernel_backend, args.fuse_gate_up, args.fold_norms, args.pdl),
        structured_outputs=StructuredOutputsConfig.from_flags(
            args.structured_outputs_backend,
            args.structured_outputs_disable_fallback,
            args.structured_outputs_compile_timeout,
            args.structured_outputs_config,
        ),
        speculative=SpeculativeConfig.from_value(args.speculative_config),
    )
