"""EAGLE draft heads, EAGLE-1 and EAGLE-3, read from the public checkpoint layouts.

Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty"
(arXiv:2401.15077); Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test" (arXiv:2503.01840). A head is one decoder layer over
the target's states: its row at position i reads the token t(i+1) and a state of the target at
position i, and predicts t(i+2). Drafting chains it: each further row reads the head's own
state `g` of the row before (EAGLE's feature extrapolation)::

    EAGLE-1  x = fc(cat(embed(t), h))      h (H,): the target's final, post-norm hidden state
             r = x + attn(x)               layer 0 has no input norm
             g = r + mlp(post_norm(r))
             logits = target.lm_head(g)    no final norm; embed and lm_head are the target's

    EAGLE-3  x = fc(a)                     a (3H,): the residual stream entering target layers
                                           (2, L // 2, L - 3), or `eagle_aux_hidden_state_
                                           layer_ids`; a fed-back g (H,) skips fc
             r = x + attn(cat(input_norm(embed(t)), hidden_norm(x)))    q/k/v read 2H
             g = r + mlp(post_norm(r))     (`norm_before_residual`: r starts at hidden_norm(x))
             d = argmax(lm_head(norm(g)))  over the draft vocabulary; the token is d + d2t[d]

Layouts (checked against vLLM's llama_eagle.py and llama_eagle3.py weight loading):
yuhuili/EAGLE-LLaMA3-Instruct-8B (EAGLE-1): config.json a LlamaConfig of one layer; weights
`fc.weight` (`fc.bias` in some), `layers.0.self_attn.{q,k,v,o}_proj.weight`,
`layers.0.post_attention_layernorm.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`, and
maybe `embed_tokens.weight` (vLLM shares the target's, as here). yuhuili/EAGLE3-LLaMA3.1-
Instruct-8B (EAGLE-3): `draft_vocab_size` in config.json; weights `fc.weight` (3H -> H),
`midlayer.*` (the layer, with `hidden_norm.weight` and `input_layernorm.weight`), `norm.weight`,
`lm_head.weight` (draft vocabulary rows), `d2t` (draft id -> target id offset), `t2d` (a mask
over the target vocabulary, unused), and `embed_tokens.weight` where the head has its own.
A "model." prefix is dropped; safetensors or pytorch_model.bin.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig, _parse_rope
from engine.layers import Kernels, Linear, QKVLinear, RMSNorm, RotaryEmbedding
from engine.models.llama import LlamaDecoderLayer

FIELD = "speculative_config.model"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
AUX_FIELD = "eagle_aux_hidden_state_layer_ids"


@dataclass(frozen=True, slots=True)
class EagleHeadConfig:
    """A head's shape: `layer` is its decoder layer's config (the target's vocabulary, dtype
    and context length); `aux_layers` the target layers whose entering stream EAGLE-3 reads."""

    eagle3: bool
    layer: ModelConfig
    draft_vocab_size: int
    aux_layers: tuple[int, ...] = ()  # EAGLE-1: () (the final hidden state)
    fc_bias: bool = False
    norm_before_residual: bool = False

    @property
    def state_size(self) -> int:
        """The width of one position's target state (H, or 3H for EAGLE-3)."""
        return self.layer.hidden_size * max(len(self.aux_layers), 1)


def read_head_config(path: str | Path, eagle3: bool, target: ModelConfig) -> EagleHeadConfig:
    """The head's config from `path`/config.json, checked against the target. ValueError
    naming `speculative_config.model` and the key for anything missing or mismatched."""
    file = Path(path) / "config.json"
    try:
        hf = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{FIELD}: cannot read the EAGLE head's config {file} ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{FIELD}: {file} is not a JSON object")
    try:
        layer = _layer_config(hf, file, target)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{FIELD}: {file}: {e}") from None
    draft_vocab = int(hf.get("draft_vocab_size") or target.vocab_size) if eagle3 else 0
    aux = _aux_layers(hf, file, target.num_layers) if eagle3 else ()
    return EagleHeadConfig(
        eagle3, layer, draft_vocab or target.vocab_size, aux,
        norm_before_residual=bool(hf.get("norm_before_residual", False)),
    )  # fmt: skip


def _layer_config(hf: dict[str, Any], file: Path, target: ModelConfig) -> ModelConfig:
    for key, want in (("hidden_size", target.hidden_size), ("vocab_size", target.vocab_size),
                      ("target_hidden_size", target.hidden_size)):  # fmt: skip
        if key in hf and hf[key] is not None and int(hf[key]) != want:
            raise ValueError(f"{key} is {hf[key]}, but the target model's is {want}")
    if int(hf.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"num_hidden_layers is {hf['num_hidden_layers']}: heads of one layer only")
    num_heads = int(hf["num_attention_heads"])
    rope_theta, rope_scaling = (target.rope_theta, target.rope_scaling)
    if "rope_theta" in hf or "rope_parameters" in hf:
        rope_theta, rope_scaling = _parse_rope(hf)
    bias = bool(hf.get("attention_bias", False))
    return dataclasses.replace(
        target, model=str(file.parent), intermediate_size=int(hf["intermediate_size"]),
        num_layers=1, num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or target.hidden_size // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
        rope_scaling=rope_scaling, qkv_bias=bias, o_proj_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=False, sliding_window=None,
        tie_word_embeddings=False,
    )  # fmt: skip


def _aux_layers(hf: dict[str, Any], file: Path, num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's three target layers (vLLM's convention: id i is the stream entering layer i),
    from the config (top level or `eagle_config`), else vLLM's default (2, L // 2, L - 3)."""
    nested = hf.get("eagle_config") if isinstance(hf.get("eagle_config"), dict) else {}
    ids = hf.get(AUX_FIELD) or nested.get(AUX_FIELD)
    if ids is None:
        ids = [2, num_layers // 2, num_layers - 3]
        where = f"the default for a target of {num_layers} layers; set {AUX_FIELD}"
    else:
        where = AUX_FIELD
    if (not isinstance(ids, list) or len(ids) != 3
            or not all(isinstance(i, int) and 0 <= i < num_layers for i in ids)):  # fmt: skip
        raise ValueError(
            f"{FIELD}: {file}: {AUX_FIELD} must be 3 layer ids in [0, {num_layers}), "
            f"got {ids!r} ({where})"
        )
    return tuple(ids)


class EagleHead(nn.Module):
    """One EAGLE head (module doc) over a paged KV cache of its own (one layer). The target's
    `embed_tokens` (and EAGLE-1's `lm_head`) are used, not owned: `share`."""

    def __init__(self, config: EagleHeadConfig, kernels: Kernels, own_embed: bool) -> None:
        super().__init__()
        self.config = config
        c = config.layer
        size, dtype = c.hidden_size, c.dtype
        fc_in = config.state_size if config.eagle3 else size + config.state_size
        self.fc = nn.Linear(fc_in, size, bias=config.fc_bias, dtype=dtype)
        layer = LlamaDecoderLayer(c, 0, kernels)
        if config.eagle3:  # the attention reads cat(embeds, hidden): 2H wide
            layer.self_attn.qkv_proj = QKVLinear(
                2 * size, c.num_heads, c.num_kv_heads, c.head_dim, bias=c.qkv_bias,
                dtype=dtype, kernels=kernels, fuse_rope=False,
            )  # fmt: skip
            layer.hidden_norm = RMSNorm(size, c.rms_norm_eps, dtype, kernels)
            self.norm = RMSNorm(size, c.rms_norm_eps, dtype, kernels)
            self.lm_head = Linear(size, config.draft_vocab_size, bias=False, dtype=dtype,
                                  kernels=kernels)  # fmt: skip
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        else:
            del layer.input_layernorm  # EAGLE-1's layer 0 has none
        self.layers = nn.ModuleList([layer])
        self.embed_tokens = nn.Embedding(c.vocab_size, size, dtype=dtype) if own_embed else None
        self.rotary = RotaryEmbedding(
            c.head_dim, c.max_model_len, c.rope_theta, c.rope_scaling, dtype, kernels
        )
        self._target: tuple[nn.Module, nn.Module] | None = None  # (embed_tokens, lm_head)

    def share(self, embed_tokens: nn.Module, lm_head: nn.Module) -> None:
        """Use the target's embedding (unless the checkpoint has one) and lm_head (EAGLE-1)."""
        self._target = (embed_tokens, lm_head)

    def forward(
        self,
        tokens: torch.Tensor,  # (T,) int64: t(i + 1) of each row's position i
        positions: torch.Tensor,  # (T,) int64
        states: torch.Tensor,  # (T, state_size) the target's, or (T, H) the head's own
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
        attn_meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H) the head's states g, pre-norm (fed back when chaining)
        assert self._target is not None, "share() the target's embedding first"
        embed = (self.embed_tokens or self._target[0])(tokens)  # (T, H)
        layer = self.layers[0]
        rope = self.rotary.at(positions)
        if self.config.eagle3:
            x = self.fc(states) if states.shape[-1] != embed.shape[-1] else states  # (T, H)
            normed = layer.hidden_norm(x)
            residual = normed if self.config.norm_before_residual else x
            attn_in = torch.cat([layer.input_layernorm(embed), normed], dim=-1)  # (T, 2H)
        else:
            residual = attn_in = self.fc(torch.cat([embed, states], dim=-1))  # (T, H)
        out = layer.self_attn(attn_in, rope, kv_cache, attn_meta)  # (T, H)
        normed, residual = layer.post_attention_layernorm.add_norm(out, residual)
        return layer.mlp(normed) + residual

    def draft(self, g: torch.Tensor) -> torch.Tensor:
        """The greedy target token ids (N,) after the head's states `g` (N, H)."""
        assert self._target is not None
        if not self.config.eagle3:
            return self._target[1](g).argmax(dim=-1)
        ids = self.lm_head(self.norm(g)).argmax(dim=-1)  # (N,) draft vocabulary ids
        return ids + self.d2t[ids]


def load_eagle_head(
    path: str | Path, eagle3: bool, target: ModelConfig, device: torch.device, kernels: Kernels
) -> EagleHead:
    """The head in directory `path` on `device`, in the target's dtype (share() it next).
    ValueError naming `speculative_config.model` and the file or weight for anything wrong."""
    config = read_head_config(path, eagle3, target)
    weights = _read_weights(Path(path), eagle3)
    config = dataclasses.replace(config, fc_bias="fc.bias" in weights)
    with torch.device(device):
        head = EagleHead(config, kernels, own_embed=eagle3 and "embed_tokens.weight" in weights)
    _load(head, weights, Path(path))
    if eagle3:
        _check_d2t(head.d2t, target.vocab_size, Path(path))
    return head.requires_grad_(False).eval()


def _read_weights(directory: Path, eagle3: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under this module's names: "model." dropped, `midlayer.` as
    `layers.0.`; what vLLM ignores dropped too (EAGLE-1's embedding, lm_head and layer-0
    input norm; EAGLE-3's `t2d`)."""
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                raw = load_file(file)
            else:
                raw = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (any unreadable file is the same user error)
            raise ValueError(f"{FIELD}: cannot read {file} ({e})") from None
        ignored = {"t2d"} if eagle3 else {
            "embed_tokens.weight", "lm_head.weight", "layers.0.input_layernorm.weight"}  # fmt: skip
        out = {}
        for key, tensor in raw.items():
            key = key.removeprefix("model.").replace("midlayer.", "layers.0.")
            if key not in ignored:
                out[key] = tensor
        return out
    raise ValueError(f"{FIELD}: {directory} has no weights ({' or '.join(WEIGHT_FILES)})")


def _load(head: EagleHead, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy `weights` into `head`, q/k/v and gate/up into their fused rows (engine.models.
    loader's layout); every parameter must be filled, and nothing else given."""
    c = head.config.layer
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    fused = {"qkv_proj": [("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
             "gate_up_proj": [("gate_proj", inter), ("up_proj", inter)]}  # fmt: skip
    targets: dict[str, tuple[torch.Tensor, int, int]] = {}  # name -> (tensor, first row, rows)
    params = dict(head.named_parameters())
    if head.config.eagle3:
        params["d2t"] = head.d2t
    for name, param in params.items():
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf not in fused:
            targets[name] = (param, 0, param.shape[0])
            continue
        row = 0
        for part, rows in fused[leaf]:
            targets[f"{parent}.{part}.{kind}"] = (param, row, rows)
            row += rows
    unknown = sorted(set(weights) - set(targets))
    if unknown:
        raise ValueError(f"{FIELD}: {where}: unexpected weight(s) {', '.join(unknown[:5])}")
    with torch.no_grad():
        for key, (param, row, rows) in targets.items():
            if key not in weights:
                raise ValueError(f"{FIELD}: {where}: weight {key!r} is missing")
            tensor, want = weights[key], (rows, *param.shape[1:])
            if tuple(tensor.shape) != want:
                raise ValueError(f"{FIELD}: {where}: weight {key!r} has shape "
                                 f"{tuple(tensor.shape)}, expected {want}")  # fmt: skip
            param[row : row + rows].copy_(tensor)


def _check_d2t(d2t: torch.Tensor, vocab_size: int, where: Path) -> None:
    """Every draft id must map into the target's vocabulary."""
    ids = torch.arange(d2t.shape[0], device=d2t.device) + d2t
    if bool((ids < 0).any()) or bool((ids >= vocab_size).any()):
        raise ValueError(f"{FIELD}: {where}: d2t maps draft ids outside the target's "
                         f"vocabulary of {vocab_size}")  # fmt: skip
