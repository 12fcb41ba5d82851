"""The kernel switches: `KernelConfig`, what it resolves to (`engine.layers.Kernels`), the
layers' choice, the flags that set it, and no switch read from the environment."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch

from engine.attention import TorchPagedAttention
from engine.config import KernelConfig, ModelConfig
from engine.layers import TORCH, Kernels, RMSNorm, SiluAndMul
from engine.layers import kernels as kernels_module
from engine.layers.activation import silu_mul_ref
from engine.layers.norm import add_norm_ref
from engine.layers.rotary import TorchRope
from engine.models.llama import LlamaDecoderLayer
from engine.models.loader import load_model
from launcher import cli
from worker_common.engine_args import add_worker_args, engine_config, engine_kwargs

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it here


def test_a_kernel_config_refuses_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="auto, triton, torch.*'cuda'"):
        KernelConfig(backend="cuda")


def test_describe_names_the_switches_as_the_flags_do() -> None:
    assert KernelConfig(fuse_gate_up=False).describe() == {
        "kernel_backend": "auto", "fuse_gate_up": False, "fold_norms": True, "pdl": True,
    }  # fmt: skip
    assert Kernels.choose(KernelConfig(), torch.device("cpu"), torch.float32).describe() == {
        "kernel_backend": "torch", "fuse_gate_up": False, "fold_norms": False, "pdl": False,
    }  # fmt: skip


@pytest.fixture()
def triton_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resolve as on a GPU machine: triton installed, PDL supported (nothing is launched)."""
    monkeypatch.setattr(kernels_module, "_triton_installed", lambda: True)
    monkeypatch.setattr(kernels_module, "_pdl_supported", lambda device: device.type == "cuda")


@pytest.mark.usefixtures("triton_installed")
def test_auto_is_triton_on_cuda_and_each_switch_applies_where_it_can() -> None:
    bf16 = Kernels.choose(KernelConfig(), CUDA, torch.bfloat16)
    assert bf16 == Kernels(triton=True, fuse_gate_up=True, fold_norms=True, pdl=True)
    fp32 = Kernels.choose(KernelConfig(), CUDA, torch.float32)
    assert fp32 == Kernels(triton=True, fuse_gate_up=True, fold_norms=False, pdl=True)
    off = KernelConfig(fuse_gate_up=False, fold_norms=False, pdl=False)
    assert Kernels.choose(off, CUDA, torch.bfloat16) == Kernels(triton=True)
    # The torch reference, asked for on a GPU or chosen on the CPU, takes no fusion.
    assert Kernels.choose(KernelConfig(backend="torch"), CUDA, torch.bfloat16) == TORCH
    assert Kernels.choose(KernelConfig(), torch.device("cpu"), torch.bfloat16) == TORCH


def test_triton_asked_for_without_triton_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(kernels_module, "_triton_installed", lambda: False)
    with pytest.raises(ValueError, match="triton is not installed"):
        Kernels.choose(KernelConfig(backend="triton"), CUDA, torch.bfloat16)
    assert Kernels.choose(KernelConfig(), CUDA, torch.bfloat16) == TORCH  # auto falls back


def test_the_torch_path_layers_take_the_references(tiny_model) -> None:
    config = ModelConfig.from_pretrained(tiny_model("qwen3"))
    model = load_model(config, torch.device("cpu"))  # the default KernelConfig on the CPU
    assert model.kernels == TORCH
    layer = model.model.layers[0]
    assert isinstance(layer, LlamaDecoderLayer) and layer.self_attn.q_norm is not None
    assert layer.input_layernorm._add_norm is add_norm_ref
    assert layer.self_attn.q_norm._add_norm is add_norm_ref
    assert layer.mlp.gate_up_proj.act._silu_mul is silu_mul_ref
    assert isinstance(layer.self_attn.attn.backend, TorchPagedAttention)
    assert isinstance(model.model.rotary.at(torch.arange(3)), TorchRope)
    assert not layer.self_attn.qkv_proj.fuses_rope and not layer.norms_folded
    assert not layer.self_attn.qkv_proj.one_row(torch.zeros(1, config.hidden_size))


def test_the_reference_layers_compute_their_math() -> None:
    norm = RMSNorm(8, 1e-6, torch.float32, TORCH)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    out, summed = norm.add_norm(x, residual)
    h = x + residual
    torch.testing.assert_close(out, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(summed, h)
    gate_up = torch.randn(3, 8)
    expected = torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:]
    torch.testing.assert_close(SiluAndMul(TORCH)(gate_up), expected)


def _worker_args(*words: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_args(parser)
    return parser.parse_args(list(words))


def test_worker_flags_reach_the_engine_config(tiny_model) -> None:
    model = str(tiny_model("llama"))
    assert engine_config(_worker_args("--model", model)).kernels == KernelConfig()
    args = _worker_args("--model", model, "--kernel-backend", "torch", "--no-fuse-gate-up",
                        "--no-fold-norms", "--no-pdl")  # fmt: skip
    assert engine_config(args).kernels == KernelConfig("torch", False, False, False)
    with pytest.raises(SystemExit):  # argparse names the choices
        _worker_args("--model", model, "--kernel-backend", "cuda")


def test_serve_forwards_the_kernel_flags_to_its_workers(tmp_path: Path, tiny_model) -> None:
    from launcher.serve import cluster_spec

    args = cli.parse_args(["serve", "--model", str(tiny_model("llama")), "--kernel-backend",
                           "torch", "--no-pdl"])  # fmt: skip
    words = cluster_spec(args).worker_args
    assert "--no-pdl" in words and words[words.index("--kernel-backend") + 1] == "torch"
    assert "--no-fuse-gate-up" not in words and "--fuse-gate-up" not in words  # at its default


def test_generate_passes_the_kernel_flags_it_was_given() -> None:
    args = cli.parse_args(["generate", "--kernel-backend", "torch", "--no-fold-norms", "hi"])
    kwargs = engine_kwargs(args)
    assert (kwargs["kernel_backend"], kwargs["fold_norms"]) == ("torch", False)
    assert (kwargs["pdl"], kwargs["fuse_gate_up"]) == (True, True)  # their defaults


def test_the_offline_llm_takes_the_kernel_switches(tiny_model) -> None:
    from engine import LLM

    llm = LLM(str(tiny_model("llama")), kernel_backend="torch", fuse_gate_up=False, pdl=False)
    kernels = llm.engine.core.config.kernels
    assert (kernels.backend, kernels.fuse_gate_up, kernels.fold_norms, kernels.pdl) == (
        "torch", False, True, False,
    )  # fmt: skip


def _env_reads(path: Path) -> set[str]:
    """The string constants a module reads from the environment (os.environ[...],
    os.environ.get(...), os.getenv(...))."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        key = None
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            key = node.slice
        elif isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in (
            "os.environ.get", "os.getenv",
        ):  # fmt: skip
            key = node.args[0]
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            names.add(key.value)
    return names


def test_the_engine_and_the_kernels_read_no_switch_from_the_environment() -> None:
    reads = {
        (str(path.relative_to(ROOT)), name)
        for package in ("engine", "baton_kernels")
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in _env_reads(path)
    }
    # Where the demo model is cached, and whether Triton runs its CPU interpreter (Triton's own
    # variable): neither changes what the engine computes or how fast.
    assert reads == {
        ("engine/models/demo.py", "BATON_CACHE_DIR"),
        ("engine/models/demo.py", "XDG_CACHE_HOME"),
        ("baton_kernels/pdl.py", "TRITON_INTERPRET"),
    }
