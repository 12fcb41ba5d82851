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
`engine.models.loader` fills them from a Hugging Face checkpoint. The layers (`engine.layers`)
run Triton kernels or the torch reference, as the `Kernels` given to the model chose.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.layers import (
    Attention,
    GateUpLinear,
    Kernels,
    Linear,
    QKVLinear,
    RMSNorm,
    Rope,
    RotaryEmbedding,
)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention of one layer; the backend does the cache and the softmax."""

    def __init__(self, config: ModelConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        dtype = config.dtype
        # One token on the GPU path: projection, rotation and KV store in one kernel; not with
        # Qwen3's per-head q/k norms, which come between the first two.
        self.qkv_proj = QKVLinear(
            config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
            bias=config.qkv_bias, dtype=dtype, kernels=kernels, fuse_rope=not config.qk_norm,
        )  # fmt: skip
        self.o_proj = Linear(
            self.q_size, config.hidden_size, bias=config.o_proj_bias, dtype=dtype, kernels=kernels
        )
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, kernels)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype, kernels)
        self.attn = Attention(self.head_dim, config.sliding_window, kernels)

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        rope: Rope,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden)
        if self.qkv_proj.takes_rope(x):  # one token: q/k/v, rotary and KV store in one kernel
            out = self.attend_one_token(x, None, rope, kv_cache, attn_meta)
        else:
            qkv = self.qkv_proj(x)  # (T, q_size + 2 * kv_size)
            out = self.attend(qkv, rope, kv_cache, attn_meta)
        return self.o_proj(out)

    def forward_folded(
        self,
        h: torch.Tensor,  # (1, hidden): the residual stream of one token
        norm_eps: float,
        rope: Rope,
        kv_cache: torch.Tensor,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (1, hidden): h + attn(norm(h))
        """One token with the input norm's weight folded into `qkv_proj`
        (`LlamaForCausalLM.fold_norm_weights`): the q/k/v GEMV normalises h itself and the o
        projection's GEMV adds the residual, so the layer runs no norm or add kernel."""
        if self.qkv_proj.fuses_rope:
            out = self.attend_one_token(h, norm_eps, rope, kv_cache, attn_meta)
        else:  # Qwen3: the q/k norms come between the projection and the rotation
            qkv = self.qkv_proj.forward_normed(h, norm_eps)  # (1, q_size + 2 * kv_size)
            out = self.attend(qkv, rope, kv_cache, attn_meta)
        return self.o_proj(out, residual=h)

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
        out = self.attn(q, k, v, rope, kv_cache, attn_meta)  # (T, H, D)
        return out.reshape(num_tokens, self.q_size)

    def attend_one_token(
        self,
        x: torch.Tensor,  # (1, hidden)
        norm_eps: float | None,  # normalise x first (the norm's weight folded into qkv_proj)
        rope: Rope,
        kv_cache: torch.Tensor,
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (1, q_size), before the o projection
        """`attend` of one token whose q/k/v projection, rotation and KV store are one kernel
        (`QKVLinear.rotate_and_store`); the backend then only attends."""
        q = self.qkv_proj.rotate_and_store(x, rope, kv_cache, attn_meta.slot_mapping, norm_eps)
        return self.attn.attend(q, kv_cache, attn_meta).reshape(1, self.q_size)  # q: (1, H, D)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        dtype, bias = config.dtype, config.mlp_bias
        self.gate_up_proj = GateUpLinear(
            config.hidden_size, config.intermediate_size, bias=bias, dtype=dtype, kernels=kernels
        )
        self.down_proj = Linear(
            config.intermediate_size, config.hidden_size, bias=bias, dtype=dtype, kernels=kernels
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden) -> (T, hidden)
        return self.down_proj(self.gate_up_proj(x))  # via (T, I): silu(gate) * up

    def forward_folded(self, h: torch.Tensor, norm_eps: float) -> torch.Tensor:
        """h + mlp(norm(h)) for one row (1, hidden), the post-attention norm's weight folded
        into `gate_up_proj`: the gate/up GEMV normalises, the down GEMV adds."""
        return self.down_proj(self.gate_up_proj(h, norm_eps=norm_eps), residual=h)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int, kernels: Kernels) -> None:
        super().__init__()
        size, eps, dtype = config.hidden_size, config.rms_norm_eps, config.dtype
        self.input_layernorm = RMSNorm(size, eps, dtype, kernels)
        self.self_attn = LlamaAttention(config, layer_idx, kernels)
        self.post_attention_layernorm = RMSNorm(size, eps, dtype, kernels)
        self.mlp = LlamaMLP(config, kernels)
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
        if self.norms_folded and self.self_attn.qkv_proj.one_row(hidden):
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

    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=config.dtype)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, kernels) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype, kernels)
        # Called with i after layer i's forward pass (its KV is then in the cache): layer-wise
        # KV export. Set by the model runner for the steps that export; None otherwise.
        self.layer_hook: Callable[[int], None] | None = None
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_model_len,
            config.rope_theta,
            config.rope_scaling,
            config.dtype,
            kernels,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[torch.Tensor],  # num_layers x (2, num_blocks, block_size, Hkv, D)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, hidden), final-normed
        return self.forward_with_aux(input_ids, positions, kv_caches, attn_meta)[0]

    def forward_with_aux(
        self,
        input_ids: torch.Tensor,  # (T,) int64
        positions: torch.Tensor,  # (T,) int64
        kv_caches: list[torch.Tensor],
        attn_meta: AttentionMetadata,
        aux_layers: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # (T, hidden) final-normed, (T, hidden) each
        """`forward`, and the residual stream entering each layer of `aux_layers` (0: the
        embeddings; vLLM's and HF's `hidden_states[i]` convention), which EAGLE-3 reads."""
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        rope = self.rotary.at(positions)  # shared by every layer
        residual = None
        aux: dict[int, torch.Tensor] = {}
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i in aux_layers:
                aux[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(hidden, residual, rope, kv_cache, attn_meta)
            if self.layer_hook is not None:
                self.layer_hook(i)
        return self.norm.add_norm(hidden, residual)[0], [aux[i] for i in aux_layers]


class LlamaForCausalLM(nn.Module):
    """A Llama-family language model over a paged KV cache.

    `forward` returns the final-normed hidden states of every new token (a speculator such as
    EAGLE can read them); `compute_logits` projects only the rows the sampler needs.
    Parameters are created in `config.dtype` on the current default device and left for
    `engine.models.loader.load_model` to overwrite.
    """

    def __init__(self, config: ModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels
        self.model = LlamaModel(config, kernels)
        self.lm_head = Linear(
            config.hidden_size, config.vocab_size, bias=False, dtype=config.dtype, kernels=kernels
        )
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def fold_norm_weights(self) -> bool:
        """Multiply each layer's input and post-attention RMSNorm weights into the projections
        that read them (`baton_kernels.gemv.fold_norm_weight`: q/k/v, gate/up) and set those
        norms' weights to one. Batched steps then compute the same model (norm without weight,
        folded projection); one-token steps apply the whole norm inside the GEMVs
        (`LlamaDecoderLayer.forward_folded`). Only where `Kernels.fold_norms` (the Triton path
        in half precision, unless turned off); float32 keeps transformers' exact op order. Call
        once, after loading; returns whether it folded."""
        if not self.kernels.fold_norms:
            return False
        from baton_kernels.gemv import fold_norm_weight

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

    def forward_with_aux(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_meta: AttentionMetadata,
        aux_layers: tuple[int, ...],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`forward`, and the residual stream entering each of `aux_layers` (`LlamaModel`)."""
        return self.model.forward_with_aux(input_ids, positions, kv_caches, attn_meta, aux_layers)

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """(N, hidden) hidden states -> (N, vocab_size) logits, float32 unless `float32` is
        False (then in the model's dtype: the sampler casts its own copy anyway)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits
