"""The Llama family of decoder-only transformers (Touvron et al. 2023, "Llama 2"; Llama 3) in torch.

One implementation covers the architectures `engine.config.ModelConfig` accepts; they differ
only in switches the config carries:

    Llama 2/3   rope scaling "linear" / "llama3"
    Qwen2       bias on q/k/v
    Qwen3       per-head RMSNorm on q and k before rotary, explicit head_dim
    Mistral     sliding-window attention (handled by the attention backend)

The batch is ragged and flattened: `T` is the total number of new tokens of all sequences this
step; the attention backend reads and writes the paged KV cache. Weights follow transformers'
names except that q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj` (one GEMM each);
`engine.models.loader` fills them from a Hugging Face checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata, TritonPagedAttention
from engine.config import ModelConfig
from engine.models.rotary import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) over the last dim, computed in float32.

    Op order matches transformers' LlamaRMSNorm, so float32 results agree to rounding. With
    `use_kernels` (the GPU path) the fused Triton kernel of `baton_kernels.rms_norm` does the same
    math (and the residual add) in one pass.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, use_kernels: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return self.add_norm(x, None)[0]

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if self.use_kernels:
            from baton_kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(x.dtype), x


def gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `baton_kernels.gemv` runs `x @ weight.T` (one half-precision row on CUDA)."""
    from baton_kernels.gemv import takes

    return takes(x, weight)


def project(linear: nn.Linear, x: torch.Tensor, use_kernels: bool) -> torch.Tensor:
    """`linear(x)`; on the kernel path, one row (batch-1 decode) times a weight of up to 32 MiB
    goes through `baton_kernels.gemv` instead of cuBLAS."""
    if use_kernels and gemv_takes(x, linear.weight):
        from baton_kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias)
    return linear(x)


class Rope:
    """The rotation of one step's positions, shared by every layer: the Triton kernel rotates
    q and k in place from the cos/sin cache (GPU path), or the cos/sin rows are looked up once
    and applied with torch ops."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor, use_kernels: bool):
        self.cos_sin_cache = rotary.cos_sin
        self.positions = positions
        self.cos_sin = None if use_kernels else rotary.lookup(positions)  # (T, 2, 1, D)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D), k (T, Hkv, D) -> rotated (in place on the kernel path)."""
        if self.cos_sin is None:
            from baton_kernels.rotary import rotary

            return rotary(q, k, self.positions, self.cos_sin_cache)
        return apply_rotary(q, self.cos_sin), apply_rotary(k, self.cos_sin)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention of one layer; the backend does the cache and the softmax."""

    def __init__(self, config: ModelConfig, layer_idx: int, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.attn_backend = attn_backend
        self.use_kernels = isinstance(attn_backend, TritonPagedAttention)
        dtype = config.dtype
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias, dtype=dtype
        )
        self.o_proj = nn.Linear(
            self.q_size, config.hidden_size, bias=config.o_proj_bias, dtype=dtype
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, self.use_kernels)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, self.use_kernels)
        # One token on the GPU path (batch-1 decode): projection, rotation and KV store in one
        # kernel. Not with Qwen3's per-head q/k norms, which come between the first two.
        self.fused_backend = attn_backend if self.use_kernels and not config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: Rope,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden)
        num_tokens = x.shape[0]
        if self.fused_backend is not None and gemv_takes(x, self.qkv_proj.weight):
            return self.forward_one_token(x, rope, kv_cache, attn_meta)
        qkv = project(self.qkv_proj, x, self.use_kernels)  # (T, q_size + 2 * kv_size)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn_backend.forward(
            q, k, v, kv_cache, attn_meta, self.scale, self.sliding_window, rope
        )  # (T, H, D); the backend rotates q and k (the Triton one with the KV store)
        return project(self.o_proj, out.reshape(num_tokens, self.q_size), self.use_kernels)

    def forward_one_token(
        self, x: torch.Tensor, rope: Rope, kv_cache: torch.Tensor, attn_meta: AttentionMetadata
    ) -> torch.Tensor:  # (1, hidden)
        """`forward` of one token through `baton_kernels.gemv.gemv_qkv_rope` (q/k/v projection,
        rotary and the KV store in one kernel); the backend then only attends."""
        from baton_kernels.gemv import gemv_qkv_rope

        assert isinstance(self.fused_backend, TritonPagedAttention)
        q = gemv_qkv_rope(
            x, self.qkv_proj.weight, self.qkv_proj.bias, self.num_heads, self.num_kv_heads,
            rope.positions, rope.cos_sin_cache, kv_cache, attn_meta.slot_mapping,
        )  # fmt: skip
        out = self.fused_backend.attend(q, kv_cache, attn_meta, self.scale, self.sliding_window)
        return project(self.o_proj, out.reshape(1, self.q_size), True)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, use_kernels: bool = False) -> None:
        super().__init__()
        self.use_kernels = use_kernels  # the fused silu_mul Triton kernel (GPU path)
        self.intermediate_size = config.intermediate_size
        dtype, bias = config.dtype, config.mlp_bias
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=bias, dtype=dtype
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=bias, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        if self.use_kernels:
            from baton_kernels.gemv import gemv_gate_up_silu, takes_gate_up

            if takes_gate_up(x, self.gate_up_proj.weight):  # one row: GEMV and activation fused
                act = gemv_gate_up_silu(x, self.gate_up_proj.weight, self.gate_up_proj.bias)
                return project(self.down_proj, act, True)
        gate_up = self.gate_up_proj(x)  # (T, 2I): [gate | up]
        if self.use_kernels:
            from baton_kernels.silu_mul import silu_mul

            return project(self.down_proj, silu_mul(gate_up), self.use_kernels)
        gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, attn_backend: AttentionBackend) -> None:
        super().__init__()
        use_kernels = isinstance(attn_backend, TritonPagedAttention)
        size, eps, dtype = config.hidden_size, config.rms_norm_eps, config.dtype
        self.input_layernorm = RMSNorm(size, eps, dtype, use_kernels)
        self.self_attn = LlamaAttention(config, layer_idx, attn_backend)
        self.post_attention_layernorm = RMSNorm(size, eps, dtype, use_kernels)
        self.mlp = LlamaMLP(config, use_kernels)

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden): the previous layer's output, not yet added
        residual: torch.Tensor | None,  # (T, hidden): the stream before it; None at layer 0
        rope: Rope,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        attn_meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (mlp output, residual stream), both (T, hidden)
        """x + attn(norm(x)), then + mlp(norm(.)), with each add fused into the next norm:
        the residual stream is `hidden + residual`, summed by the norm that reads it."""
        normed, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(normed, rope, kv_cache, attn_meta)
        normed, residual = self.post_attention_layernorm.add_norm(hidden, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm: token ids -> last hidden states."""

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, attn_backend) for i in range(config.num_layers)
        )
        use_kernels = isinstance(attn_backend, TritonPagedAttention)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype, use_kernels)
        self.use_kernels = use_kernels
        # Called with i after layer i's forward pass (its KV is then in the cache): layer-wise
        # KV export. Set by the model runner for the steps that export; None otherwise.
        self.layer_hook: Callable[[int], None] | None = None
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_model_len,
            config.rope_theta,
            config.rope_scaling,
            config.dtype,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[torch.Tensor],  # num_layers x (2, num_blocks, block_size, Hkv, D)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden), final-normed
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        rope = Rope(self.rotary, positions, self.use_kernels)  # shared by every layer
        residual = None
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            hidden, residual = layer(hidden, residual, rope, kv_cache, attn_meta)
            if self.layer_hook is not None:
                self.layer_hook(i)
        return self.norm.add_norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """A Llama-family language model over a paged KV cache.

    `forward` returns the final-normed hidden states of every new token (a speculator such as
    EAGLE can read them); `compute_logits` projects only the rows the sampler needs.
    Parameters are created in `config.dtype` on the current default device and left for
    `engine.models.loader.load_model` to overwrite.
    """

    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_backend)
        self.lm_head = nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64, the ragged batch flattened
        positions: torch.Tensor,  # (T,) int64 absolute positions in each sequence
        kv_caches: list[torch.Tensor],  # num_layers x (2, num_blocks, block_size, Hkv, D)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden_size)
        """Run the new tokens through the model, writing their K/V into `kv_caches`."""
        return self.model(input_ids, positions, kv_caches, attn_meta)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """(N, hidden) hidden states -> (N, vocab_size) logits, float32 unless `float32` is
        False (then in the model's dtype: the sampler casts its own copy anyway)."""
        logits = project(self.lm_head, hidden, self.model.use_kernels)
        return logits.float() if float32 else logits
