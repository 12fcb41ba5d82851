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


def gemv_one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `baton_kernels.gemv`'s kernels can take `x @ weight.T` at all (any size)."""
    from baton_kernels.gemv import one_row

    return one_row(x, weight)


def project(
    linear: nn.Linear, x: torch.Tensor, use_kernels: bool, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear(x)`, plus `residual` if given; on the kernel path, one row (batch-1 decode) times
    a weight of up to 32 MiB goes through `baton_kernels.gemv` instead of cuBLAS, the residual
    added in its epilogue."""
    if use_kernels and gemv_takes(x, linear.weight):
        from baton_kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias, residual=residual)
    y = linear(x)
    return y if residual is None else y + residual


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
        if self.fused_backend is not None and gemv_takes(x, self.qkv_proj.weight):
            out = self.attend_one_token(x, None, rope, kv_cache, attn_meta)
        else:
            qkv = project(self.qkv_proj, x, self.use_kernels)  # (T, q_size + 2 * kv_size)
            out = self.attend(qkv, rope, kv_cache, attn_meta)
        return project(self.o_proj, out, self.use_kernels)

    def forward_folded(
        self,
        h: torch.Tensor,  # (1, hidden): the residual stream of one token
        norm_eps: float,
        rope: Rope,
        kv_cache: torch.Tensor,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (1, hidden): h + attn(norm(h))
        """One token on the GPU path with the input norm's weight folded into `qkv_proj`
        (`LlamaForCausalLM.fold_norm_weights`): the q/k/v GEMV normalises h itself and the o
        projection's GEMV adds the residual, so the layer runs no norm or add kernel."""
        from baton_kernels.gemv import gemv

        if self.fused_backend is not None:
            out = self.attend_one_token(h, norm_eps, rope, kv_cache, attn_meta)
        else:  # Qwen3: the q/k norms come between the projection and the rotation
            qkv = gemv(h, self.qkv_proj.weight, self.qkv_proj.bias, norm_eps=norm_eps)
            out = self.attend(qkv, rope, kv_cache, attn_meta)
        return project(self.o_proj, out, True, residual=h)

    def attend(
        self, qkv: torch.Tensor, rope: Rope, kv_cache: torch.Tensor, attn_meta: AttentionMetadata
    ) -> torch.Tensor:  # (T, q_size + 2 * kv_size) -> (T, q_size), before the o projection
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn_backend.forward(
            q, k, v, kv_cache, attn_meta, self.scale, self.sliding_window, rope
        )  # (T, H, D); the backend rotates q and k (the Triton one with the KV store)
        return out.reshape(num_tokens, self.q_size)

    def attend_one_token(
        self,
        x: torch.Tensor,  # (1, hidden)
        norm_eps: float | None,  # normalise x first (the norm's weight folded into qkv_proj)
        rope: Rope,
        kv_cache: torch.Tensor,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (1, q_size), before the o projection
        """`attend` of one token through `baton_kernels.gemv.gemv_qkv_rope` (q/k/v projection,
        rotary and the KV store in one kernel); the backend then only attends."""
        from baton_kernels.gemv import gemv_qkv_rope

        assert isinstance(self.fused_backend, TritonPagedAttention)
        q = gemv_qkv_rope(
            x, self.qkv_proj.weight, self.qkv_proj.bias, self.num_heads, self.num_kv_heads,
            rope.positions, rope.cos_sin_cache, kv_cache, attn_meta.slot_mapping, norm_eps,
        )  # fmt: skip
        out = self.fused_backend.attend(q, kv_cache, attn_meta, self.scale, self.sliding_window)
        return out.reshape(1, self.q_size)


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

    def forward_folded(self, h: torch.Tensor, norm_eps: float) -> torch.Tensor:
        """h + mlp(norm(h)) for one row (1, hidden) on the GPU path, the post-attention norm's
        weight folded into `gate_up_proj`: the gate/up GEMV normalises, the down GEMV adds."""
        from baton_kernels.gemv import gemv, gemv_gate_up_silu, takes_gate_up

        w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
        if takes_gate_up(h, w):
            act = gemv_gate_up_silu(h, w, b, norm_eps=norm_eps)
        else:
            from baton_kernels.silu_mul import silu_mul

            act = silu_mul(gemv(h, w, b, norm_eps=norm_eps))
        return project(self.down_proj, act, True, residual=h)


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
        self.norms_folded = False  # set by LlamaForCausalLM.fold_norm_weights

    def forward(
        self,
        hidden: torch.Tensor,  # (T, hidden): the previous layer's output, not yet added
        residual: torch.Tensor | None,  # (T, hidden): the stream before it; None at layer 0
        rope: Rope,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        attn_meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # (mlp output, residual stream or None)
        """x + attn(norm(x)), then + mlp(norm(.)), with each add fused into the next norm:
        the residual stream is `hidden + residual`, summed by the norm that reads it. One token
        with the norms folded (GPU, half precision) takes `forward_folded`."""
        if self.norms_folded and gemv_one_row(hidden, self.self_attn.qkv_proj.weight):
            return self.forward_folded(hidden if residual is None else hidden + residual, rope,
                                       kv_cache, attn_meta), None  # fmt: skip
        normed, residual = self.input_layernorm.add_norm(hidden, residual)
        hidden = self.self_attn(normed, rope, kv_cache, attn_meta)
        normed, residual = self.post_attention_layernorm.add_norm(hidden, residual)
        return self.mlp(normed), residual

    def forward_folded(
        self, h: torch.Tensor, rope: Rope, kv_cache: torch.Tensor, attn_meta: AttentionMetadata
    ) -> torch.Tensor:  # (1, hidden): the residual stream after this layer
        """The layer for one token with no norm or add kernel: the q/k/v and gate/up GEMVs
        normalise their input, the o and down GEMVs add the residual. The norms' scales apply
        to the GEMVs' float32 sums, so results differ from the unfused path's by roundings, as
        cuBLAS's and the GEMV's already do."""
        eps = self.input_layernorm.eps
        h = self.self_attn.forward_folded(h, eps, rope, kv_cache, attn_meta)
        return self.mlp.forward_folded(h, self.post_attention_layernorm.eps)


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

    @torch.no_grad()
    def fold_norm_weights(self) -> bool:
        """Multiply each layer's input and post-attention RMSNorm weights into the projections
        that read them (`baton_kernels.gemv.fold_norm_weight`: q/k/v, gate/up) and set those
        norms' weights to one. Batched steps then compute the same model (norm without weight,
        folded projection); one-token steps apply the whole norm inside the GEMVs
        (`LlamaDecoderLayer.forward_folded`). Only on the Triton path in half precision, and not
        with `BATON_GEMV_NORM=0`; float32 keeps transformers' exact op order. Call once, after
        loading; returns whether it folded."""
        if not self.model.use_kernels or self.config.dtype not in (torch.float16, torch.bfloat16):
            return False
        from baton_kernels.gemv import NORM_FUSED, fold_norm_weight

        if not NORM_FUSED:
            return False

        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer) and not layer.norms_folded
            for norm, linear in (
                (layer.input_layernorm, layer.self_attn.qkv_proj),
                (layer.post_attention_layernorm, layer.mlp.gate_up_proj),
            ):
                linear.weight.copy_(fold_norm_weight(linear.weight, norm.weight))
                norm.weight.fill_(1.0)
            layer.norms_folded = True
        return True

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
