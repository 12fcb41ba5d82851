"""MLP speculator drafting (`"method": "mlp_speculator"`): IBM's fms-extras `MLPSpeculator`.

Wertheimer et al. 2024, "Accelerating Production LLMs with Combined Token/Embedding
Speculators" (arXiv:2404.19124). A chain of small heads reads the target's final hidden state
(after the final norm: what lm_head reads) and the tokens drafted so far:

    s_0 = h                            (B, emb_dim) the state behind the last token x_0
    s_0 = ln0(s_0) / sqrt(2)           only with `scale_input`
    for head i in 0 .. n_predict - 1:
        s_{i+1} = gelu(ln_i(state_weight * proj_i(s_i) + emb_weight * emb_i(x_i)))
        x_{i+1} = argmax(head_i(s_{i+1}))      the i-th draft token

with state_weight = 0.5 ** (0.5 / n_predict) and emb_weight = sqrt((1 - state_weight ** 2)
* inner_dim / 2); ln_i is fms' `LayerNormParameterized` (no mean subtraction: x / sqrt(mean(x ** 2)
+ 1e-6), then weight and bias); ln0 has no weight or bias. `inner_dim` 0 means `emb_dim`.
`tie_weights` shares one embedding, one head and one norm across the heads, and one projection
across heads 1 .. n_predict - 1 (the first reads `emb_dim`, so it stays apart).

Checkpoints are the public "accelerator" directories (e.g. ibm-fms/llama3-8b-accelerator):
config.json with `vocab_size`, `emb_dim`, `inner_dim`, `n_predict`, `top_k_tokens_per_head`,
`n_candidates`, `tie_weights`, `scale_input`, and weights `emb.i.weight`, `proj.i.weight`,
`head.i.weight`, `ln.i.weight`, `ln.i.bias` (a "speculator." prefix is dropped) in
model.safetensors or pytorch_model.bin. With `tie_weights` only index 0 (and `proj.1`) is needed.
We draft one greedy chain (top-1 per head) and verify it: `top_k_tokens_per_head` and
`n_candidates` (fms' candidate tree) are read but not used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import SpeculativeConfig
from engine.cuda_graphs import default_capture_sizes, padded_batch
from engine.request import Request
from engine.spec_decode.proposer import DrafterContext, Proposer

LN_EPS = 1e-6  # fms' LayerNormParameterized default
CONFIG_NAME = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
FIELD = "speculative_config.model"


@dataclass(frozen=True, slots=True)
class MlpSpeculatorConfig:
    """An fms MLP speculator's config.json (its keys and meanings)."""

    vocab_size: int
    emb_dim: int  # the target's hidden size
    inner_dim: int  # 0: emb_dim
    n_predict: int  # heads: draft tokens per step, at most
    tie_weights: bool = False
    scale_input: bool = False
    top_k_tokens_per_head: tuple[int, ...] = ()  # fms' candidate tree: not used here
    n_candidates: int = 1  # fms' candidate tree: not used here

    @property
    def state_dim(self) -> int:
        """The heads' width: `inner_dim`, or `emb_dim` when it is 0."""
        return self.inner_dim or self.emb_dim

    def to_json(self) -> dict[str, Any]:
        """config.json's content, with the keys transformers and vLLM look for."""
        return {
            "architectures": ["MLPSpeculatorPreTrainedModel"],
            "model_type": "mlp_speculator",
            "vocab_size": self.vocab_size,
            "emb_dim": self.emb_dim,
            "inner_dim": self.inner_dim,
            "n_predict": self.n_predict,
            "top_k_tokens_per_head": list(self.top_k_tokens_per_head) or [1] * self.n_predict,
            "n_candidates": self.n_candidates,
            "tie_weights": self.tie_weights,
            "scale_input": self.scale_input,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> MlpSpeculatorConfig:
        """From config.json's content; a missing or bad key is named (ValueError)."""

        def integer(key: str, low: int, default: int | None = None) -> int:
            value = data.get(key, default)
            if value is None:
                raise ValueError(f"{FIELD}: {where} has no {key!r}")
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(
                    f"{FIELD}: {where}: {key} must be an integer >= {low}, got {value!r}"
                )
            return value

        def flag(key: str) -> bool:
            value = data.get(key, False)
            if not isinstance(value, bool):
                raise ValueError(f"{FIELD}: {where}: {key} must be true or false, got {value!r}")
            return value

        top_k = data.get("top_k_tokens_per_head", [])
        if not isinstance(top_k, list) or not all(isinstance(k, int) for k in top_k):
            raise ValueError(f"{FIELD}: {where}: top_k_tokens_per_head must be a list of integers")
        config = cls(
            vocab_size=integer("vocab_size", 1),
            emb_dim=integer("emb_dim", 1),
            inner_dim=integer("inner_dim", 0, default=0),
            n_predict=integer("n_predict", 1),
            tie_weights=flag("tie_weights"),
            scale_input=flag("scale_input"),
            top_k_tokens_per_head=tuple(top_k),
            n_candidates=integer("n_candidates", 1, default=1),
        )
        if config.tie_weights and config.n_predict < 2:
            raise ValueError(f"{FIELD}: {where}: tie_weights needs n_predict >= 2")
        return config


class SpeculatorNorm(nn.Module):
    """fms' `LayerNormParameterized` as the speculator uses it: x / sqrt(mean(x ** 2) + eps),
    then `weight * x + bias` when `affine` (no mean is subtracted)."""

    def __init__(self, size: int, affine: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(size)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + LN_EPS)
        if self.weight is not None and self.bias is not None:
            x = self.weight * x + self.bias
        return x


class MLPSpeculator(nn.Module):
    """fms-extras' MLPSpeculator: `forward` for training (every position, ground-truth tokens),
    `draft` for inference (one greedy chain per row)."""

    def __init__(self, config: MlpSpeculatorConfig) -> None:
        super().__init__()
        self.config = config
        n, d, inner, vocab = config.n_predict, config.emb_dim, config.state_dim, config.vocab_size
        shared = config.tie_weights
        self.emb = _modules(n, shared, lambda: nn.Embedding(vocab, inner))
        self.head = _modules(n, shared, lambda: nn.Linear(inner, vocab, bias=False))
        self.ln = _modules(n, shared, lambda: SpeculatorNorm(inner, affine=True))
        later = _modules(n - 1, shared, lambda: nn.Linear(inner, inner, bias=False))
        self.proj = nn.ModuleList([nn.Linear(d, inner, bias=False), *later])
        self.ln0 = SpeculatorNorm(d, affine=False) if config.scale_input else None
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (inner / 2))
        self.activation = nn.GELU()

    def step(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Head i's new state from the previous one (..., in_dim) and tokens (...)."""
        z = self.emb[i](tokens) * self.emb_weight  # (..., inner)
        state = self.proj[i](state) * self.state_weight + z
        return self.activation(self.ln[i](state))  # (..., inner)

    def scaled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's hidden states as head 0 reads them (`scale_input`: ln0, / sqrt(2))."""
        return hidden if self.ln0 is None else self.ln0(hidden) / math.sqrt(2)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Training: `hidden` (B, L, emb_dim) the target's states, `tokens` (B, L + n_predict)
        where tokens[:, t] follows the token whose state is hidden[:, t]. Returns the logits
        (n_predict, B, L, vocab): head i at t predicts tokens[:, t + i + 1]."""
        state, length, out = self.scaled(hidden), hidden.shape[1], []
        for i in range(self.config.n_predict):
            state = self.step(i, state, tokens[:, i : i + length])  # (B, L, inner)
            out.append(self.head[i](state))  # (B, L, vocab)
        return torch.stack(out)

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, last: torch.Tensor, num: int) -> torch.Tensor:
        """Inference: `hidden` (B, emb_dim) the state that sampled `last` (B,); returns `num`
        greedy draft tokens per row (B, num), num <= n_predict."""
        state, token, drafts = self.scaled(hidden), last, []
        for i in range(num):
            state = self.step(i, state, token)  # (B, inner)
            token = self.head[i](state).argmax(dim=-1)  # (B,)
            drafts.append(token)
        return torch.stack(drafts, dim=1)


def _modules(num: int, shared: bool, make: Callable[[], nn.Module]) -> nn.ModuleList:
    """`num` modules from `make`: one module `num` times when `shared` (tied weights)."""
    if shared and num:
        one = make()
        return nn.ModuleList([one] * num)
    return nn.ModuleList(make() for _ in range(num))


def speculator_state_dict(model: MLPSpeculator) -> dict[str, torch.Tensor]:
    """The weights under fms' names, each shared tensor once (tied: index 0, and proj.1)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out[name] = param.detach().contiguous()
    return out


def load_mlp_speculator(path: str | Path, vocab_size: int, hidden_size: int) -> MLPSpeculator:
    """The speculator in directory `path`, checked against the target's vocabulary and hidden
    size. ValueError naming the file, key or field for anything missing or mismatched."""
    directory = Path(path)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{FIELD}: {directory} has no {CONFIG_NAME}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{FIELD}: {config_path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{FIELD}: {config_path} is not a JSON object")
    config = MlpSpeculatorConfig.from_json(data, str(config_path))
    for key, value, want, what in (
        ("vocab_size", config.vocab_size, vocab_size, "vocab_size"),
        ("emb_dim", config.emb_dim, hidden_size, "hidden_size"),
    ):
        if value != want:
            raise ValueError(
                f"{FIELD}: {config_path}: {key} is {value}, but the target model's {what} is {want}"
            )
    model = MLPSpeculator(config)
    _load_weights(model, _read_weights(directory), directory)
    return model.eval()


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The named tensors of the first weight file present, "speculator." prefixes dropped."""
    for name in WEIGHT_FILES:
        file = directory / name
        if file.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                weights = load_file(file)
            else:
                weights = torch.load(file, map_location="cpu", weights_only=True)
            return {k.removeprefix("speculator."): v for k, v in weights.items()}
    raise ValueError(f"{FIELD}: {directory} has no weights ({' or '.join(WEIGHT_FILES)})")


def _load_weights(model: MLPSpeculator, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy `weights` into `model`'s parameters, each shared one from its first name."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise ValueError(f"{FIELD}: {where}: unexpected weight(s) {', '.join(unknown[:5])}")
    with torch.no_grad():
        for name, param in speculator_state_dict(model).items():
            if name not in weights:
                raise ValueError(f"{FIELD}: {where}: weight {name!r} is missing")
            tensor = weights[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{FIELD}: {where}: weight {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            expected[name].copy_(tensor)


class GraphedDraft:
    """`MLPSpeculator.draft` captured in CUDA graphs, one per batch size of `sizes` (captured
    at first use, sharing a memory pool): a draft of three heads is some 40 small kernels,
    whose launches cost about as much as the target's own graphed step when run eagerly."""

    def __init__(self, model: MLPSpeculator, num: int, sizes: Sequence[int]) -> None:
        self.model, self.num, self.sizes = model, num, sorted(sizes)
        param = next(model.parameters())
        n = self.sizes[-1]
        self.hidden = torch.zeros(n, model.config.emb_dim, dtype=param.dtype, device=param.device)
        self.last = torch.zeros(n, dtype=torch.long, device=param.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor | None:
        """(S, num) drafts of rows `hidden` (S, emb_dim) and `last` (S,); None when S is
        above the largest size (the caller drafts eagerly)."""
        rows = hidden.shape[0]
        batch = padded_batch(self.sizes, rows)
        if batch is None:
            return None
        self.hidden[:rows].copy_(hidden)
        self.last[:rows].copy_(last)
        graph, out = self._graphs.get(batch) or self._capture(batch)
        graph.replay()
        return out[:rows]

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        hidden, last = self.hidden[:batch], self.last[:batch]
        stream = torch.cuda.Stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(stream):
            self.model.draft(hidden, last, self.num)  # settle the allocator
        torch.cuda.current_stream(hidden.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.draft(hidden, last, self.num)
        self._graphs[batch] = (graph, out)
        return graph, out


class MlpSpeculatorProposer(Proposer):
    """Drafts from each request's `spec_hidden` and last token, all requests in one batched
    pass per head, on the target's device and dtype (through CUDA graphs when the target
    decodes through them); no draft for a request without a state."""

    def __init__(self, config: SpeculativeConfig, context: DrafterContext) -> None:
        super().__init__(config)
        assert config.model is not None  # SpeculativeConfig requires it for this method
        target = context.model
        model = load_mlp_speculator(config.model, target.vocab_size, target.hidden_size)
        n_predict = model.config.n_predict
        if config.num_speculative_tokens > n_predict:
            raise ValueError(
                f"speculative_config.num_speculative_tokens ({config.num_speculative_tokens}) "
                f"is above the MLP speculator's n_predict ({n_predict}, {config.model})"
            )
        self.model = model.to(device=context.device, dtype=context.dtype)
        self.device = context.device
        self.graphed: GraphedDraft | None = None
        if context.cuda_graphs:
            sizes = default_capture_sizes(context.max_num_seqs)
            self.graphed = GraphedDraft(self.model, config.num_speculative_tokens, sizes)

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        n_predict = self.model.config.n_predict
        wanted = [min(k, n_predict) for k in max_drafts]
        rows = [i for i, r in enumerate(requests) if wanted[i] > 0 and r.spec_hidden is not None]
        drafts: list[list[int]] = [[] for _ in requests]
        if not rows:
            return drafts
        hidden = torch.stack([requests[i].spec_hidden for i in rows])  # type: ignore[misc]
        last = torch.tensor([requests[i].all_token_ids[-1] for i in rows], device=self.device)
        out = None if self.graphed is None else self.graphed(hidden, last)
        if out is None:
            out = self.model.draft(hidden, last, max(wanted[i] for i in rows))
        tokens = out.tolist()
        for row, i in enumerate(rows):
            drafts[i] = tokens[row][: wanted[i]]
        return drafts
