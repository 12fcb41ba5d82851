"""Training an EAGLE-1 head (engine.spec_decode.eagle_head) for a model: `baton
train-speculator --method eagle`.

Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"
(arXiv:2401.15077), section 4.2. For a sequence of tokens with the target's states h_t (the
final, post-norm state: `Target.hidden`, the state the engine feeds the head), the head's row t
reads (token t+1, h_t), attends causally over the rows before it, and gives g_t, which should
be h_{t+1} (regression) and, through the target's lm_head, give token t+2 (classification)::

    x_t = fc(cat(embed(t+1), h_t))           (B, L, H)
    r_t = x_t + attn(x_{<=t})                no input norm (EAGLE-1's layer 0)
    g_t = r_t + mlp(post_norm(r_t))
    loss = SmoothL1(g_t, h_{t+1}) + 0.1 * CE(lm_head(g_t), token t+2)     (the paper's w_cls)

teacher-forced on the target's states (the paper's uniform noise on them is not added). The
options, data (stage 1 text chunks, stage 2 the target's greedy answers: their rows only, not
the prompt's), schedule and Trainer are train_mlp's.

The layer has the target's shape (heads, kv heads, head dim, intermediate size, RoPE, norm
eps), as the public heads do. It starts as g = embed(t): fc = [I, 0] passes the embedding on
(the state's half learns from zero), q/k/v, gate and up are drawn as transformers initialises
Llama (normal, std 0.02), o_proj and down_proj are zero (each branch starts as the identity).
Saved in yuhuili's EAGLE-1 layout, which `"method": "eagle"` loads: config.json (a one-layer
LlamaConfig) and model.safetensors (`fc.weight`, `layers.0.*`); the embedding and lm_head are
the target's, frozen, not saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from engine.config import ModelConfig
from engine.layers.rotary import apply_rotary, rope_inv_freq
from engine.spec_decode.train_mlp import Batch, Target, Trainee, TrainOptions

CLS_WEIGHT = 0.1  # the token loss's weight against the state loss (the paper's w_cls)
INIT_STD = 0.02  # transformers' Llama initializer_range
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")  # copied from the target's config


class EagleAttention(nn.Module):
    """Causal grouped-query attention over a whole sequence, with RoPE from position 0: the
    engine's head attention without the paged cache. Weights under Hugging Face's names."""

    inv_freq: torch.Tensor  # (head_dim // 2,) float32

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling),
                             persistent=False)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        cos_sin = self.cos_sin(length, x.device).to(x.dtype)  # (T, 2, 1, D)
        q, k = apply_rotary(q, cos_sin), apply_rotary(k, cos_sin)
        group = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def cos_sin(self, length: int, device: torch.device) -> torch.Tensor:
        """(T, 2, 1, D) float32 cos/sin of positions 0 .. T-1, as RotaryEmbedding builds them."""
        positions = torch.arange(length, device=device).to(torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
        return torch.stack((emb.cos(), emb.sin()), dim=1).unsqueeze(2)


class EagleMLP(nn.Module):
    """SwiGLU, as the target's: down(silu(gate(x)) * up(x))."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EagleLayer(nn.Module):
    """EAGLE-1's decoder layer: no input norm."""

    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.self_attn = EagleAttention(c)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.mlp = EagleMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        r = x + self.self_attn(x)
        return r + self.mlp(self.post_attention_layernorm(r))


class EagleTrainHead(nn.Module):
    """The EAGLE-1 head for training (module doc), over whole sequences: the math of
    eagle_head.EagleHead with EAGLE-1's parameter names (`fc`, `layers.0.*`). The target's
    embedding and lm_head are frozen buffers, not in the state dict."""

    embed: torch.Tensor  # (V, H)
    lm_head: torch.Tensor  # (V, H)

    def __init__(self, c: ModelConfig, embed: torch.Tensor, lm_head: torch.Tensor) -> None:
        super().__init__()
        self.config = c
        self.fc = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([EagleLayer(c)])
        self.register_buffer("embed", embed, persistent=False)  # (V, H)
        self.register_buffer("lm_head", lm_head, persistent=False)  # (V, H)

    def forward(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """tokens (B, T): t+1 of each row t; states (B, T, H): h_t -> the head's g (B, T, H)."""
        x = self.fc(torch.cat([F.embedding(tokens, self.embed), states], dim=-1))  # (B, T, H)
        return self.layers[0](x)

    def logits(self, g: torch.Tensor) -> torch.Tensor:
        """(..., H) head states -> (..., V) the target's lm_head logits."""
        return g @ self.lm_head.T

    def reset_parameters(self) -> None:
        """The init of the module doc: the head starts as g = embed(t)."""
        size = self.config.hidden_size
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.fill_(1.0)
                elif name.endswith(("o_proj.weight", "down_proj.weight")):
                    param.zero_()
                else:
                    param.normal_(0.0, INIT_STD)
            self.fc.weight.copy_(torch.cat([torch.eye(size), torch.zeros(size, size)], dim=1))


def eagle_loss(head: EagleTrainHead, batch: Batch) -> tuple[torch.Tensor, list[float]]:
    """SmoothL1(g_t, h_{t+1}) + CLS_WEIGHT * CE(lm_head(g_t), token t+2) over the rows t whose
    next state and token are real; the parts: (state loss, token loss)."""
    length = batch.hidden.shape[1]
    g = head(batch.tokens[:, :length], batch.hidden)[:, :-1]  # (B, L-1, H): rows 0 .. L-2
    real = batch.valid[:, 2 : length + 1]  # (B, L-1): h_{t+1} is real where token t+2 is
    if not bool(real.any()):  # stage 2: a batch of one-token answers
        zero = g.sum() * 0.0
        return zero, [0.0, 0.0]
    state = F.smooth_l1_loss(g[real], batch.hidden[:, 1:][real])
    token = F.cross_entropy(head.logits(g[real]), batch.tokens[:, 1:length][real])
    loss = state + CLS_WEIGHT * token
    return loss, [float(state.detach()), float(token.detach())]


def new_eagle_head(options: TrainOptions, target: Target) -> EagleTrainHead:
    """A freshly initialised head of the target's layer shape, on the target's device."""
    config = ModelConfig.from_pretrained(options.model, dtype=torch.float32)
    embed, lm_head = target.embeddings()
    head = EagleTrainHead(config, embed.float(), lm_head.float()).to(target.device)
    head.reset_parameters()
    return head


def eagle_trainee(options: TrainOptions, target: Target) -> Trainee:
    """A fresh EAGLE-1 head for `target`, its loss and its save."""
    head = new_eagle_head(options, target)

    def save(out: Path) -> None:
        save_eagle_head(head, options.model, out)

    return Trainee(head, lambda batch: eagle_loss(head, batch), "state_token_losses", save)


def save_eagle_head(head: EagleTrainHead, model: Path, out: Path) -> None:
    """Write config.json (a one-layer LlamaConfig of the target's shape, its RoPE keys) and
    model.safetensors (`fc.weight`, `layers.0.*`, float32) into directory `out`."""
    c = head.config
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_target = json.loads((Path(model) / "config.json").read_text())
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": 1, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps, "vocab_size": c.vocab_size, "hidden_act": "silu",
        "max_position_embeddings": c.max_model_len, "attention_bias": False,
        "torch_dtype": "float32", "bias": False,
    }  # fmt: skip
    config |= {key: hf_target[key] for key in ROPE_KEYS if key in hf_target}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
