"""Engine configuration: small dataclasses, one per concern.

`ModelConfig` is parsed from a local Hugging Face directory's `config.json`; `CacheConfig` sizes
the paged KV cache; `SchedulerConfig` bounds each step's batch; `KernelConfig` picks the layers'
kernels and the GPU path's fusions. `EngineConfig` bundles them.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
KERNEL_BACKENDS = ("auto", "triton", "torch")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(slots=True)
class ModelConfig:
    """What the engine needs to know about a Llama-family model.

    Lengths are in tokens. `rope_scaling` is None or a dict with at least `rope_type`.
    """

    model: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    served_model_name: str = ""  # the model's identity in block hashes and in the API

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        served_model_name: str | None = None,
    ) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` for extra eos ids) from `model`.

        `served_model_name` defaults to the directory's name.
        """
        path = Path(model)
        hf = _read_json(path / "config.json", what="model config")
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"model: unsupported architecture {archs or hf.get('model_type')!r} in {path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_theta, rope_scaling = _parse_rope(hf)
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        context = int(hf.get("max_position_embeddings", 2048))
        if max_model_len is not None and not 1 <= max_model_len <= context:
            raise ValueError(
                f"max_model_len must be in [1, {context}] (the model's context), "
                f"got {max_model_len}"
            )
        return cls(
            model=str(path),
            architecture=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_model_len=max_model_len or context,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            o_proj_bias=arch != "Qwen2ForCausalLM" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(hf, arch),
            dtype=_resolve_dtype(dtype, hf),
            eos_token_ids=_eos_ids(path, hf),
            bos_token_id=hf.get("bos_token_id"),
            served_model_name=served_model_name or path.resolve().name,
        )


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache sizing and prefix caching. `block_size` is in tokens; the budget is in
    bytes. `num_blocks`, when set, overrides the byte budget (tests use it to force preemption);
    with neither, the cache takes 1 GiB on CPU, and on a GPU what is left of
    `gpu_memory_utilization` of its memory once the weights are loaded (as vLLM sizes it).
    """

    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # None: 1 GiB on CPU, gpu_memory_utilization on GPU
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    enable_kv_events: bool = False  # buffer KV events for a host that drains them
    gpu_memory_utilization: float = 0.9  # GPU: the share of its memory weights + KV may take

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError(
                f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}"
            )
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(slots=True)
class SchedulerConfig:
    """Per-step limits (tokens computed in one forward pass, sequences in the batch), the
    admission policy, and admission control.

    `policy` is fcfs, priority or fair; `aging_seconds` is how long a waiting request must wait
    for its priority to improve by one level (None: no aging); beyond `max_num_waiting` waiting
    requests, new ones are refused with EngineOverloadedError (None: no limit).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    policy: str = "fcfs"
    aging_seconds: float | None = 60.0
    max_num_waiting: int | None = None

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_waiting is not None and self.max_num_waiting < 0:
            raise ValueError(f"max_num_waiting must be >= 0, got {self.max_num_waiting}")
        if self.aging_seconds is not None and self.aging_seconds <= 0:
            raise ValueError(f"aging_seconds must be > 0, got {self.aging_seconds}")


@dataclass(slots=True)
class KernelConfig:
    """The kernels the model's layers run, chosen once when the engine is built
    (`engine.layers.Kernels.choose`). The fusions and PDL are on by default: each switch is there
    to measure what it gains on the same machine, and applies on the Triton path only.

    `backend`: "triton" (`baton_kernels`, CUDA only), "torch" (the reference, e.g. to compare on a
    GPU) or "auto" (Triton on CUDA when triton is installed, else torch).
    `fuse_gate_up`: a one-row step's gate/up projection and SwiGLU activation in one kernel
    (`baton_kernels.gemv.gemv_gate_up_silu`); off: cuBLAS, then `silu_mul`.
    `fold_norms`: in half precision, the RMSNorm weights are folded into the q/k/v and gate/up
    projections at load, so a one-row step runs its norms and residual adds inside the GEMVs
    (`LlamaDecoderLayer.forward_folded`); off: a norm kernel and an add per norm.
    `pdl`: programmatic dependent launch on Hopper and later (`baton_kernels.pdl`).
    """

    backend: str = "auto"
    fuse_gate_up: bool = True
    fold_norms: bool = True
    pdl: bool = True

    def __post_init__(self) -> None:
        if self.backend not in KERNEL_BACKENDS:
            raise ValueError(
                f"kernel backend must be one of {', '.join(KERNEL_BACKENDS)}, got {self.backend!r}"
            )

    def describe(self) -> dict[str, Any]:
        """The switches as asked for, for a benchmark's result file (`Kernels.describe` has what
        they resolved to on a device)."""
        return {
            "kernel_backend": self.backend,
            "fuse_gate_up": self.fuse_gate_up,
            "fold_norms": self.fold_norms,
            "pdl": self.pdl,
        }


@dataclass(slots=True)
class StructuredOutputsConfig:
    """Grammar backends (engine.structured): `backend` is a registered name or "auto"
    (xgrammar, then what it cannot compile to guidance; with `disable_fallback`, xgrammar
    alone, as vLLM's); compiles run on `compile_workers` threads and the `cache_size` most
    recently used grammars are kept. A request whose grammar has not compiled
    `compile_timeout_s` seconds after it arrived ends with an error naming its constraint."""

    backend: str = "auto"
    compile_workers: int = 2
    cache_size: int = 256
    disable_fallback: bool = False
    compile_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        from engine.structured.registry import backend_names

        if self.backend not in backend_names():
            raise ValueError(
                f"structured_outputs_backend must be one of {', '.join(backend_names())}, "
                f"got {self.backend!r}"
            )
        if self.compile_workers < 1 or self.cache_size < 1:
            raise ValueError("structured outputs: compile_workers and cache_size must be >= 1")
        if not isinstance(self.disable_fallback, bool):
            raise ValueError(
                "structured_outputs_disable_fallback must be true or false, "
                f"got {self.disable_fallback!r}"
            )
        if isinstance(self.compile_timeout_s, bool) or not (
            isinstance(self.compile_timeout_s, (int, float)) and self.compile_timeout_s > 0
        ):
            raise ValueError(
                "structured_outputs_compile_timeout must be a number of seconds > 0, "
                f"got {self.compile_timeout_s!r}"
            )

    @classmethod
    def from_flags(
        cls,
        backend: str = "auto",
        disable_fallback: bool = False,
        compile_timeout_s: float = 30.0,
        config_json: str | dict[str, Any] | None = None,
    ) -> StructuredOutputsConfig:
        """From the `--structured-outputs-*` flags. `config_json` is vLLM's
        `--structured-outputs-config` (keys backend, disable_fallback): its values stand where
        the flag of the same name is at its default; a flag that says otherwise is a
        ValueError naming both."""
        from engine.structured.backend_choice import parse_backend_choice

        flags: dict[str, Any] = {"backend": backend, "disable_fallback": disable_fallback}
        if config_json is not None:
            defaults = {"backend": "auto", "disable_fallback": False}
            for key, value in parse_backend_choice(config_json).items():
                if flags[key] not in (defaults[key], value):
                    raise ValueError(
                        f"structured_outputs_config.{key} ({value!r}) contradicts "
                        f"structured_outputs_{key} ({flags[key]!r})"
                    )
                flags[key] = value
        return cls(**flags, compile_timeout_s=compile_timeout_s)


SPEC_METHODS = ("ngram", "suffix", "mlp_speculator", "eagle", "eagle3", "draft_model")
SPEC_METHODS_BUILT = ("ngram", "suffix", "mlp_speculator", "draft_model", "eagle", "eagle3")
SPEC_METHODS_READING_HIDDEN = ("mlp_speculator",)  # the target's last state per request
# ... every computed position's states (engine.spec_decode.eagle): these steps run eagerly
SPEC_METHODS_READING_STATES = ("eagle", "eagle3")
SPEC_METHODS_WITH_MODEL = ("mlp_speculator", "eagle", "eagle3", "draft_model")  # need `model`
SUFFIX_TREE_DEPTH = 24  # vLLM's default suffix_decoding_max_tree_depth


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding, as vLLM's `speculative_config` (engine.spec_decode).

    A drafter proposes up to `num_speculative_tokens` tokens per running request; the target
    verifies them in one forward pass (greedy: exactly; sampling: rejection sampling keeps its
    distribution). `ngram` (prompt lookup) drafts the tokens that followed the last earlier
    occurrence of the sequence's final n-gram, n from `prompt_lookup_max` down to
    `prompt_lookup_min`. `suffix` (suffix decoding) matches the end of the request's tokens in
    suffix trees of depth `suffix_decoding_max_tree_depth` (its prompt and output so far; the
    outputs of the last `suffix_decoding_max_cached_requests` finished requests, 0: none) and
    drafts the most frequent continuation, at most `suffix_decoding_max_spec_factor` times the
    match length, while its estimated probability stays >= `suffix_decoding_min_token_prob`;
    in vLLM's JSON form without `num_speculative_tokens` it drafts up to the tree depth.
    `mlp_speculator` drafts with the MLP speculator in directory `model` (fms format) from the
    target's last hidden state; without `num_speculative_tokens` it drafts its `n_predict`.
    `draft_model` drafts greedily with the smaller model in directory `model` (the target's
    vocabulary, a context at least its `max_model_len`; engine.spec_decode.draft_model).
    `eagle` / `eagle3` draft with the EAGLE head in directory `model` over the target's
    hidden states (EAGLE-1: the final one; EAGLE-3: three layers'; engine.spec_decode.eagle).
    With `disable_by_batch_size` running requests or more, nobody drafts."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    disable_by_batch_size: int | None = None
    model: str | None = None  # the drafter's weights (mlp_speculator, eagle, draft_model)
    suffix_decoding_max_tree_depth: int = SUFFIX_TREE_DEPTH  # tokens: match plus draft
    suffix_decoding_max_cached_requests: int = 10000  # finished outputs kept, oldest out first
    suffix_decoding_max_spec_factor: float = 1.0  # drafts per matched token
    suffix_decoding_min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        field_name = "speculative_config"
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"{field_name}.method must be one of {', '.join(SPEC_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.method not in SPEC_METHODS_BUILT:
            raise ValueError(
                f"{field_name}.method {self.method!r} is not implemented yet "
                f"(implemented: {', '.join(SPEC_METHODS_BUILT)})"
            )
        if self.method in SPEC_METHODS_WITH_MODEL and not self.model:
            raise ValueError(
                f"{field_name}.model (the drafter's weights directory) is required for method "
                f"{self.method!r}"
            )
        self._check_suffix_options()  # first: the depth may have set num_speculative_tokens
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"{field_name}.num_speculative_tokens must be an integer >= 1")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        lo, hi = (lo or hi or 5), (hi or lo or 5)  # vLLM's: one given sets both; none: 5
        if lo < 1 or hi < lo:
            raise ValueError(
                f"{field_name}: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo}, {hi}"
            )
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"{field_name}.disable_by_batch_size must be >= 1")

    def _check_suffix_options(self) -> None:
        """vLLM's bounds: depth >= 1, cached requests >= 0, factor >= 0, probability in [0, 1]."""
        name = "speculative_config.suffix_decoding"
        depth = self.suffix_decoding_max_tree_depth
        cached = self.suffix_decoding_max_cached_requests
        if not _is_int(depth) or depth < 1:
            raise ValueError(f"{name}_max_tree_depth must be an integer >= 1, got {depth!r}")
        if not _is_int(cached) or cached < 0:
            raise ValueError(f"{name}_max_cached_requests must be an integer >= 0, got {cached!r}")
        factor, prob = self.suffix_decoding_max_spec_factor, self.suffix_decoding_min_token_prob
        if not _is_number(factor) or factor < 0:
            raise ValueError(f"{name}_max_spec_factor must be a number >= 0, got {factor!r}")
        if not _is_number(prob) or not 0 <= prob <= 1:
            raise ValueError(f"{name}_min_token_prob must be a number in [0, 1], got {prob!r}")

    @classmethod
    def from_value(
        cls, value: str | dict[str, Any] | SpeculativeConfig | None
    ) -> SpeculativeConfig | None:
        """From JSON text, a dict (vLLM's forms) or a config; None stays None."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        return cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's JSON form; an unknown key is refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        if data.get("method") == "suffix" and "num_speculative_tokens" not in data:
            # vLLM's: suffix decoding sizes its drafts itself, up to the tree depth
            depth = data.get("suffix_decoding_max_tree_depth", SUFFIX_TREE_DEPTH)
            data = {**data, "num_speculative_tokens": depth}
        if data.get("method") == "mlp_speculator" and "num_speculative_tokens" not in data:
            # vLLM's: as many as the speculator has heads (its config's n_predict)
            data = {**data, "num_speculative_tokens": _n_predict(data.get("model"))}
        return cls(**data)


def _n_predict(model: object) -> int:
    """An MLP speculator directory's `n_predict` (config.json), for the default draft length;
    3 when `model` is not given (refused later by name)."""
    if not isinstance(model, str) or not model:
        return 3
    try:
        hf = _read_json(Path(model) / "config.json", "the MLP speculator's config")
    except ValueError as e:
        raise ValueError(f"speculative_config.{e}") from None  # "speculative_config.model: ..."
    value = hf.get("n_predict")
    if not _is_int(value) or value < 1:
        raise ValueError(
            f"speculative_config.model: {model}/config.json: n_predict must be an integer >= 1, "
            f"got {value!r}"
        )
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(slots=True)
class EngineConfig:
    """Everything one engine instance runs with."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    # GPU: run every step eagerly instead of replaying CUDA graphs for decode batches.
    enforce_eager: bool = False
    # Launch a plain-greedy decode step before the previous one's tokens are read (EngineCore
    # .step). None: on when decode steps replay CUDA graphs (on the CPU it gains nothing).
    async_scheduling: bool | None = None
    # The layers' kernels (Triton or the torch reference) and the Triton path's fusions.
    kernels: KernelConfig = field(default_factory=KernelConfig)
    structured_outputs: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    speculative: SpeculativeConfig | None = None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.parent.is_dir():
        raise ValueError(f"model: directory {path.parent} does not exist")
    if not path.is_file():
        raise ValueError(f"model: {path.parent} has no {path.name} ({what})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model: {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"model: {path} must hold a JSON object")
    return data


def _parse_rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Normalise transformers' `rope_parameters` (v5) and `rope_theta`/`rope_scaling` (v4)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(hf.get("rope_scaling") or params)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"model: unsupported rope_type {rope_type!r}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    scaling.pop("rope_theta", None)
    return theta, (None if rope_type == "default" else {"rope_type": rope_type, **scaling})


def _sliding_window(hf: dict[str, Any], arch: str) -> int | None:
    window = hf.get("sliding_window")
    qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
    if arch == "LlamaForCausalLM" or (qwen and not hf.get("use_sliding_window", False)):
        return None
    return int(window) if window else None


def _resolve_dtype(dtype: str | torch.dtype, hf: dict[str, Any]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def _eos_ids(path: Path, hf: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    sources = [hf.get("eos_token_id")]
    gen = path / "generation_config.json"
    if gen.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
    for src in sources:
        for tok in src if isinstance(src, list) else [src]:
            if isinstance(tok, int) and tok not in ids:
                ids.append(tok)
    return ids
