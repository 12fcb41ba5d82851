"""Draft-model speculative decoding (`"method": "draft_model"`): a small model drafts greedily.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al.
2023, "Accelerating Large Language Model Decoding with Speculative Sampling". A smaller model of
the same vocabulary (any architecture `engine.models` runs: Llama, Qwen2, Qwen3, Mistral) reads
each request's tokens and proposes its k greedy continuations; the target verifies them.

The drafter keeps a paged KV cache of its own (the engine's layout and attention backends, its
own blocks). Per request it remembers how many leading tokens' KV it holds that the target has
verified, and which of its drafts it wrote after them::

    cache:    t0 .. t(n-1) | d1 .. d(k-1)     n = num_verified; d_k never enters the cache
    request:  t0 .. t(n-1) | d1 .. da  x      the target accepted a drafts, then sampled x
    next:     keep n + a positions, feed x (positions n + a ..), then k - 1 one-token steps

A request's first call feeds its whole prompt and output so far (the prefill -> decode hand-off
and a resumed or preempted request are the same case: the decode worker has the tokens). Each
call is one ragged pass over every request's catch-up chunk, then one batched step per further
draft token. It runs eagerly (no CUDA graphs). A request the cache has no room for gets no
drafts until room comes back; a request not asked this call is evicted first.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata
from engine.config import KernelConfig, ModelConfig, SpeculativeConfig
from engine.layers import Kernels
from engine.models.llama import LlamaForCausalLM
from engine.models.loader import load_model
from engine.request import Request
from engine.spec_decode.proposer import DrafterContext, Proposer

FIELD = "speculative_config.model"
GPU_HEADROOM_BYTES = 256 << 20  # left free on a GPU after the drafter's cache


def draft_model_config(path: str, target: ModelConfig, dtype: torch.dtype) -> ModelConfig:
    """The drafter's config from directory `path`, in `dtype`, with the target's context length.
    ValueError naming `speculative_config.model` for an unreadable directory, another vocabulary
    size, or a context shorter than the target's `max_model_len`."""
    try:
        config = ModelConfig.from_pretrained(path, dtype=dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{FIELD}: {e}") from None
    if config.vocab_size != target.vocab_size:
        raise ValueError(
            f"{FIELD}: the draft model {path} has vocab_size {config.vocab_size}, but the "
            f"target's is {target.vocab_size}: a draft model needs the target's vocabulary"
        )
    if config.max_model_len < target.max_model_len:
        raise ValueError(
            f"{FIELD}: the draft model {path} has max_model_len {config.max_model_len}, smaller "
            f"than the target's ({target.max_model_len}): lower max_model_len"
        )
    return dataclasses.replace(config, max_model_len=target.max_model_len)


class DraftKVCache:
    """The drafter's paged KV cache: per layer (2, num_blocks, block_size, Hkv, D) as the
    engine's (`engine.attention`), a free list of block ids, and each request's blocks."""

    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        shape = (2, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=config.dtype, device=device) for _ in range(config.num_layers)
        ]
        self.num_blocks, self.block_size, self.device = num_blocks, block_size, device
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() takes the lowest id first
        self.blocks: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def reserve(self, request_id: str, num_tokens: int) -> bool:
        """Make `request_id`'s blocks cover `num_tokens` positions; False (nothing taken) when
        too few blocks are free."""
        blocks = self.blocks.setdefault(request_id, [])
        needed = -(-num_tokens // self.block_size) - len(blocks)
        if needed > len(self._free):
            return False
        blocks.extend(self._free.pop() for _ in range(max(needed, 0)))
        return True

    def free(self, request_id: str) -> None:
        """Give `request_id`'s blocks back (unknown ids: nothing)."""
        self._free.extend(reversed(self.blocks.pop(request_id, [])))

    def slots(self, request_id: str, start: int, end: int) -> list[int]:
        """The cache slots of positions start .. end - 1."""
        blocks, size = self.blocks[request_id], self.block_size
        return [blocks[p // size] * size + p % size for p in range(start, end)]

    def table(self, request_id: str, num_tokens: int) -> torch.Tensor:
        """The block ids covering the first `num_tokens` positions, (n,) int64 on the device."""
        blocks = self.blocks[request_id][: -(-num_tokens // self.block_size)]
        return torch.tensor(blocks, dtype=torch.long, device=self.device)


@dataclass(slots=True)
class DraftState:
    """What the drafter's cache holds of one request: the KV of its first `num_verified` tokens
    (all verified by the target), then that of `drafts` (unverified)."""

    num_verified: int = 0
    drafts: list[int] = field(default_factory=list)

    def num_valid(self, tokens: Sequence[int]) -> int:
        """Leading positions of `tokens` whose KV the cache holds (the drafts the target
        accepted count), at most len(tokens) - 1: the last token is always fed again."""
        n = self.num_verified
        for draft in self.drafts:
            if n >= len(tokens) or tokens[n] != draft:
                break
            n += 1
        return min(n, len(tokens) - 1)


@dataclass(slots=True)
class Chunk:
    """Tokens of one request to run at positions start .. start + len(tokens) - 1."""

    request_id: str
    tokens: list[int]
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class DraftModelProposer(Proposer):
    """Drafts with a small model of the target's vocabulary, greedily, over a paged KV cache
    of its own, batched over the requests asked (see the module doc)."""

    def __init__(self, config: SpeculativeConfig, context: DrafterContext) -> None:
        super().__init__(config)
        assert config.model is not None  # SpeculativeConfig requires it for this method
        self.device = context.device
        draft = draft_model_config(config.model, context.model, context.dtype)
        kernels = Kernels.choose(KernelConfig(), self.device, draft.dtype)
        self.model: LlamaForCausalLM = load_model(draft, self.device, kernels)
        self.max_len = draft.max_model_len
        block_size = context.block_size
        num_blocks = self._num_blocks(draft, context)
        self.cache = DraftKVCache(draft, num_blocks, block_size, self.device)
        self.states: dict[str, DraftState] = {}
        self.num_evicted = 0  # requests whose draft KV made room for others

    def _num_blocks(self, draft: ModelConfig, context: DrafterContext) -> int:
        """As many blocks as the target's cache (the same tokens fit); on a GPU no more than
        fit in its free memory less a margin. ValueError if then not even one request as long
        as the target's cache allows fits."""
        size = context.block_size
        wanted = context.num_blocks or -(-draft.max_model_len // size)
        longest = min(wanted, -(-draft.max_model_len // size))  # blocks of one request, at most
        if self.device.type == "cuda":
            elem = torch.tensor([], dtype=draft.dtype).element_size()
            block_bytes = 2 * draft.num_layers * size * draft.num_kv_heads * draft.head_dim * elem
            free, _ = torch.cuda.mem_get_info(self.device)
            wanted = min(wanted, max(free - GPU_HEADROOM_BYTES, 0) // block_bytes)
        if wanted < longest:
            raise ValueError(
                f"{FIELD}: no room for the draft model's KV cache ({wanted} blocks of {size} "
                f"tokens free, one request may need {longest}): lower gpu_memory_utilization "
                f"or max_model_len"
            )
        return wanted

    def finished(self, request: Request) -> None:
        self.states.pop(request.request_id, None)
        self.cache.free(request.request_id)

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        rows, wants = self._plan(requests, max_drafts)
        if not rows:
            return drafts
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.cuda.device(self.device) if cuda else (
            contextlib.nullcontext()
        ):
            out = self._draft([requests[i] for i in rows], wants)
        for i, tokens in zip(rows, out, strict=True):
            drafts[i] = tokens
        return drafts

    def _plan(
        self, requests: Sequence[Request], max_drafts: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """The rows that draft and how many tokens each, with their cache blocks reserved
        (evicting requests not asked now if needed; a row still without room is left out)."""
        asked = {r.request_id for r in requests}
        rows, wants = [], []
        for i, request in enumerate(requests):
            want = min(max_drafts[i], self.max_len - request.num_tokens)
            if want <= 0:
                continue
            needed = request.num_tokens + want - 1  # the last draft's KV is never written
            if not self._reserve(request.request_id, needed, asked):
                continue
            rows.append(i)
            wants.append(want)
        return rows, wants

    def _reserve(self, request_id: str, num_tokens: int, asked: set[str]) -> bool:
        if self.cache.reserve(request_id, num_tokens):
            return True
        for other in [r for r in self.states if r not in asked]:
            self.states.pop(other)
            self.cache.free(other)  # it starts over from its tokens when asked again
            self.num_evicted += 1
            if self.cache.reserve(request_id, num_tokens):
                return True
        return False

    def _draft(self, requests: list[Request], wants: list[int]) -> list[list[int]]:
        """k_i greedy tokens after each request's tokens: a catch-up pass, then one-token
        passes; the states then record what the cache holds."""
        chunks = []
        for request in requests:
            state = self.states.setdefault(request.request_id, DraftState())
            tokens = request.all_token_ids
            valid = state.num_valid(tokens)
            chunks.append(Chunk(request.request_id, tokens[valid:], valid))
        out = [[t] for t in self._forward(chunks)]
        for step in range(1, max(wants)):
            active = [i for i, want in enumerate(wants) if want > step]
            steps = [Chunk(chunks[i].request_id, [out[i][-1]], chunks[i].end + step - 1)
                     for i in active]  # fmt: skip
            for i, token in zip(active, self._forward(steps), strict=True):
                out[i].append(token)
        for request, tokens, want in zip(requests, out, wants, strict=True):
            self.states[request.request_id] = DraftState(request.num_tokens, tokens[: want - 1])
        return out

    def _forward(self, chunks: list[Chunk]) -> list[int]:
        """One ragged pass writing each chunk's KV; the greedy token after each chunk's last."""
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens))  # decodes first
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        for i in order:
            chunk = chunks[i]
            ids += chunk.tokens
            positions += range(chunk.start, chunk.end)
            slots += self.cache.slots(chunk.request_id, chunk.start, chunk.end)
            starts.append(starts[-1] + len(chunk.tokens))
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start_loc=starts,
            seq_lens=[chunks[i].end for i in order],
            block_tables=[self.cache.table(chunks[i].request_id, chunks[i].end) for i in order],
        )
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            self.cache.kv_caches,
            meta,
        )  # (T, hidden)
        last = torch.tensor(starts[1:], device=device) - 1  # (S,) each chunk's last row
        tokens = self.model.compute_logits(hidden[last]).argmax(dim=-1).tolist()  # (S,)
        result = [0] * len(chunks)
        for row, i in enumerate(order):
            result[i] = tokens[row]
        return result
