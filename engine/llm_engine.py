"""`LLMEngine`: the engine core plus tokenization, validation and detokenization.

Used in-process by the offline `LLM` API. Requests are validated in full before anything is
queued, so a bad request raises ValueError and leaves the running ones untouched.
"""

from __future__ import annotations

import array
import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch

from common.completion import CompletionTracker
from common.fan_out import FanOut
from common.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer
from engine.config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    StructuredOutputsConfig,
)
from engine.core import EngineCore
from engine.output_processor import OutputProcessor, RequestState
from engine.request import Request
from engine.validation import validate_prompt

Prompt = str | Sequence[int]


class LLMEngine:
    """Add requests, call `step()` until done; each step returns the requests it advanced."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.model)
        self.core = EngineCore(config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_args(
        cls,
        model: str,
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        num_kv_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        enable_kv_events: bool = False,
        scheduling_policy: str = "fcfs",
        aging_seconds: float | None = 60.0,
        max_num_waiting: int | None = None,
        served_model_name: str | None = None,
        seed: int = 0,
        device: str = "cpu",
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
        kernel_backend: str = "auto",
        fuse_gate_up: bool = True,
        fold_norms: bool = True,
        pdl: bool = True,
        structured_outputs_backend: str = "auto",
        structured_outputs_disable_fallback: bool = False,
        structured_outputs_compile_timeout: float = 30.0,
        structured_outputs_config: str | dict[str, Any] | None = None,
        speculative_config: str | dict[str, Any] | SpeculativeConfig | None = None,
    ) -> LLMEngine:
        """Build the configs from flat arguments (the `LLM` and CLI spelling, vLLM's)."""
        config = EngineConfig(
            model=ModelConfig.from_pretrained(model, dtype, max_model_len, served_model_name),
            cache=CacheConfig(
                block_size, kv_cache_memory_bytes, num_kv_blocks,
                enable_prefix_caching=enable_prefix_caching, enable_kv_events=enable_kv_events,
                gpu_memory_utilization=gpu_memory_utilization,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens, max_num_seqs, policy=scheduling_policy,
                aging_seconds=aging_seconds, max_num_waiting=max_num_waiting,
            ),
            device=torch.device(device),
            seed=seed,
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,
            kernels=KernelConfig(kernel_backend, fuse_gate_up, fold_norms, pdl),
            structured_outputs=StructuredOutputsConfig.from_flags(
                structured_outputs_backend, structured_outputs_disable_fallback,
                structured_outputs_compile_timeout, structured_outputs_config),
            speculative=SpeculativeConfig.from_value(speculative_config),
        )  # fmt: skip
        torch.manual_seed(seed)
        return cls(config)

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize(self, prompt: Prompt, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        try:  # integers only (numpy's too), converted at C speed
            return array.array("q", prompt).tolist()
        except (TypeError, OverflowError) as e:
            raise ValueError(f"prompt_token_ids must be integers: {e}") from None

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams,
        add_special_tokens: bool = True,
        arrival_time: float | None = None,
        priority: int = 0,
        tenant: str = "default",
        cache_salt: str | None = None,
    ) -> None:
        """Validate, tokenize and queue one request (fanned out to `params.n` children).

        `priority` (lower first) and `tenant` feed the scheduling policy; requests share cached
        prefix blocks only with requests of the same `cache_salt`.
        """
        if request_id in self.output_processor.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt, add_special_tokens)
        max_tokens = validate_prompt(token_ids, params, self.config.model)
        fan_out = FanOut(
            request_id,
            params,
            lambda index, child: CompletionTracker(index, self.tokenizer, child, token_ids),
        )
        arrival = arrival_time or time.time()
        eos = tuple(self.config.model.eos_token_ids)
        requests = [
            Request(
                child_id,
                token_ids,
                tracker.params,
                max_tokens,
                eos,
                arrival,
                priority=priority,
                tenant=tenant,
                cache_salt=cache_salt,
            )
            for child_id, tracker in fan_out.completions.items()
        ]
        added: list[str] = []
        try:
            for request in requests:
                self.core.add_request(request)
                added.append(request.request_id)
        except Exception:
            self.core.abort_requests(added)
            raise
        text = prompt if isinstance(prompt, str) else None
        self.output_processor.add(RequestState(request_id, text, token_ids, fan_out, requests[0]))

    def abort_request(self, request_ids: Sequence[str]) -> None:
        """Abort user requests (all their completions) and free their blocks."""
        for request_id in request_ids:
            self.core.abort_requests(self.output_processor.remove(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestState]:
        """Run one batch; return the states of the requests it advanced.

        A request that failed before running (its structured-outputs grammar did not compile)
        is aborted with all its completions, and ValueError (naming the field) is raised once
        the step's other outputs are applied; the other requests go on at the next step."""
        outputs = self.core.step()
        errors = [out for out in outputs if out.error is not None]
        states, stopped = self.output_processor.process(outputs)
        if stopped:
            self.core.stop_requests(stopped)
        if errors:
            parents = {self.output_processor.parent_of(out.request_id) for out in errors}
            self.abort_request([p for p in parents if p is not None])
            raise ValueError(errors[0].error)
        return states

    def check_integrity(self, expect_all_free: bool = False) -> None:
        self.core.check_integrity(expect_all_free=expect_all_free)
