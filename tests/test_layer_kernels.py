"""The Triton path's choice of kernels, on the CPU: `baton_kernels` is replaced by recording
torch stand-ins (the kernels' math, without triton), so the layers' dispatch (which kernel, with
which fusion, for which step) and their wiring (folded norms, residual epilogues) are checked
here; the kernels themselves are checked against their references in tests/gpu."""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import baton_kernels
from engine.config import ModelConfig
from engine.layers import Kernels
from engine.layers.activation import silu_mul_ref
from engine.layers.norm import add_norm_ref
from engine.models.loader import load_model
from tests.test_models import PagedKV

CALLS: list[tuple[str, frozenset[str]]] = []  # (kernel, the fusions it was asked for)
FUSIONS = ("norm_eps", "residual")  # a GEMV's folded norm and residual epilogue


def _recorded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, appending its name and the fusions it is asked for to CALLS at each call."""
    signature = inspect.signature(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        given = signature.bind(*args, **kwargs).arguments
        CALLS.append((name, frozenset(k for k in FUSIONS if given.get(k) is not None)))
        return fn(*args, **kwargs)

    return call


def _one_row(x: torch.Tensor, w: torch.Tensor) -> bool:  # baton_kernels.gemv's, less is_cuda
    return x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16)


def _gemv(x, w, b=None, config=None, *, residual=None, norm_eps=None):
    h = x.float()
    if norm_eps is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps)
    y = F.linear(h, w.float(), None if b is None else b.float()).to(x.dtype)
    return y if residual is None else y + residual


def _gate_up_silu(x, w, b=None, config=None, *, norm_eps=None):
    return silu_mul_ref(_gemv(x, w, b, norm_eps=norm_eps))


def _rotate(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin[positions, 0].unsqueeze(1), cos_sin[positions, 1].unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotary(q, k, positions, cos_sin):
    q.copy_(_rotate(q, positions, cos_sin))
    k.copy_(_rotate(k, positions, cos_sin))
    return q, k


def _write_kv(k, v, kv_cache, slots):
    flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
    flat[0, slots], flat[1, slots] = k, v


def _rotary_write_kv(q, k, v, positions, cos_sin, kv_cache, slots):
    _rotary(q, k, positions, cos_sin)
    _write_kv(k, v, kv_cache, slots)


def _qkv_rope(x, w, b, heads, kv_heads, positions, cos_sin, kv_cache, slots, norm_eps=None):
    d = kv_cache.shape[-1]
    q, k, v = _gemv(x, w, b, norm_eps=norm_eps).split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = q.view(1, heads, d), k.reshape(1, kv_heads, d), v.reshape(1, kv_heads, d)
    _rotary_write_kv(q, k, v, positions, cos_sin, kv_cache, slots)
    return q


def _attend(q, kv_cache, table, length, scale, window):
    from engine.attention import attend

    keys = kv_cache[:, table.long()].flatten(1, 2)[:, :length]  # (2, L, Hkv, D)
    return attend(q, keys[0], keys[1], scale, window)


def _decode(q, kv_cache, tables, lens, scale, window=None, out=None):
    rows = [_attend(q[i : i + 1], kv_cache, tables[i], int(lens[i]), scale, window)
            for i in range(q.shape[0])]  # fmt: skip
    out = torch.empty_like(q) if out is None else out
    out.copy_(torch.cat(rows))
    return out


def _prefill(q, kv_cache, cu, lens, tables, scale, window=None, *, max_seqlen_q, out):
    cu = cu.tolist()
    for j in range(len(cu) - 1):
        rows = slice(cu[j], cu[j + 1])
        out[rows] = _attend(q[rows], kv_cache, tables[j], int(lens[j]), scale, window)
    return out


STANDINS = {
    "gemv": {
        "gemv": _recorded("gemv", _gemv),
        "gemv_qkv_rope": _recorded("gemv_qkv_rope", _qkv_rope),
        "gemv_gate_up_silu": _recorded("gemv_gate_up_silu", _gate_up_silu),
        "takes": lambda x, w: _one_row(x, w) and w.numel() <= 1 << 24,
        "one_row": _one_row,
        "fold_norm_weight": lambda w, n: (w.float() * n.float()).to(w.dtype),
    },
    "rms_norm": {"rms_norm": _recorded("rms_norm", add_norm_ref)},
    "silu_mul": {"silu_mul": _recorded("silu_mul", silu_mul_ref)},
    "rotary": {"rotary": _recorded("rotary", _rotary),
               "rotary_write_kv": _recorded("rotary_write_kv", _rotary_write_kv)},
    "write_kv": {"write_kv": _recorded("write_kv", _write_kv)},
    "paged_decode_attention": {"paged_decode_attention": _recorded("decode_attention", _decode)},
    "paged_prefill_attention": {
        "paged_prefill_attention": _recorded("prefill_attention", _prefill)},
}  # fmt: skip


@pytest.fixture()
def standins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, functions in STANDINS.items():
        module = types.ModuleType(f"baton_kernels.{name}")
        module.__dict__.update(functions)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setattr(baton_kernels, name, module, raising=False)
    CALLS.clear()


def _steps(config: ModelConfig, kernels: Kernels) -> tuple[list[torch.Tensor], list[list]]:
    """A two-sequence prefill, then two batch-1 decode steps: each step's logits and calls."""
    model = load_model(config, torch.device("cpu"), kernels)
    cache, logits, calls = PagedKV(config), [], []
    for chunks in ({0: [5, 9, 14, 3, 7], 1: [8, 2, 11]}, {0: [4]}, {0: [6]}):
        CALLS.clear()
        logits.append(torch.cat(list(cache.step(model, chunks).values())))
        calls.append(CALLS[:])
    return logits, calls


def _layer_calls(calls: list, config: ModelConfig, tail: int) -> list:
    """The calls of a step's last layer, checked to be those of every layer after the first
    (the first's input norm has no residual to add); `tail`: the calls after the layers."""
    body = calls[: len(calls) - tail]
    per_layer = len(body) // config.num_layers
    assert per_layer * config.num_layers == len(body)
    layers = [body[i : i + per_layer] for i in range(0, len(body), per_layer)]
    assert all(layer == layers[-1] for layer in layers[1:])
    return layers[-1]


NORM, RES, NONE = frozenset({"norm_eps"}), frozenset({"residual"}), frozenset[str]()
# The GEMMs of many rows are torch's (not recorded); the o, down and lm_head projections of
# one row are `gemv`s.
PREFILL = [("rms_norm", RES), ("rotary", NONE), ("write_kv", NONE),
           ("prefill_attention", NONE), ("rms_norm", RES), ("silu_mul", NONE)]  # fmt: skip
FOLDED_DECODE = [("gemv_qkv_rope", NORM), ("decode_attention", NONE), ("gemv", RES),
                 ("gemv_gate_up_silu", NORM), ("gemv", RES)]  # fmt: skip
UNFUSED_DECODE = [("rms_norm", RES), ("gemv_qkv_rope", NONE), ("decode_attention", NONE),
                  ("gemv", NONE), ("rms_norm", RES), ("silu_mul", NONE),
                  ("gemv", NONE)]  # fmt: skip


@pytest.mark.usefixtures("standins")
@pytest.mark.parametrize(
    "kernels,decode",
    [
        (Kernels(triton=True, fuse_gate_up=True, fold_norms=True), FOLDED_DECODE),
        (Kernels(triton=True), UNFUSED_DECODE),
    ],
)
def test_llama_steps_call_the_kernels_of_their_fusions(tiny_model, kernels, decode) -> None:
    config = ModelConfig.from_pretrained(tiny_model("llama"), dtype="bfloat16")
    triton_logits, calls = _steps(config, kernels)
    assert _layer_calls(calls[0], config, tail=1) == PREFILL
    assert calls[0][-1] == ("rms_norm", RES)  # the final norm
    for step in calls[1:]:
        assert _layer_calls(step, config, tail=2) == decode
        final_norm = ("rms_norm", NONE if decode is FOLDED_DECODE else RES)  # folded: added
        assert step[-2:] == [final_norm, ("gemv", NONE)]  # and the lm_head
    _assert_like_the_reference(triton_logits, config)


def _assert_like_the_reference(logits: list[torch.Tensor], config: ModelConfig) -> None:
    torch_logits, torch_calls = _steps(config, Kernels())  # the reference: no kernel at all
    assert torch_calls == [[], [], []]
    for got, want in zip(logits, torch_logits, strict=True):  # bf16 roundings apart
        torch.testing.assert_close(got, want, atol=0.05 * float(want.abs().max()), rtol=0)


@pytest.mark.usefixtures("standins")
def test_qwen3_decodes_without_the_fused_rotary_its_qk_norms_come_between(tiny_model) -> None:
    config = ModelConfig.from_pretrained(tiny_model("qwen3"), dtype="bfloat16")
    logits, calls = _steps(config, Kernels(triton=True, fuse_gate_up=True, fold_norms=True))
    _assert_like_the_reference(logits, config)
    assert _layer_calls(calls[1], config, tail=2) == [
        ("gemv", NORM), ("rms_norm", NONE), ("rms_norm", NONE), ("rotary_write_kv", NONE),
        ("decode_attention", NONE), ("gemv", RES), ("gemv_gate_up_silu", NORM), ("gemv", RES),
    ]  # fmt: skip
