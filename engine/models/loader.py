"""Build a `LlamaForCausalLM` from a local Hugging Face directory (its tokenizer loads with
`common.tokenizer.load_tokenizer`, re-exported here).

Weights are read one tensor at a time with `safetensors` (`model.safetensors`, or the shards
listed in `model.safetensors.index.json`) and copied, cast to `config.dtype`, into the model's
parameters, so at most one checkpoint tensor is held beside the model. Fused parameters are
filled from several checkpoint tensors, stacked along the output dimension::

    qkv_proj      <- q_proj | k_proj | v_proj
    gate_up_proj  <- gate_proj | up_proj

Every error (missing directory, file or tensor, corrupt file, wrong shape) is a ValueError that
names the file or tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from common.tokenizer import load_tokenizer as load_tokenizer  # re-exported: its old home
from engine.config import KernelConfig, ModelConfig
from engine.layers import Kernels
from engine.models.llama import LlamaForCausalLM

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True, slots=True)
class TensorTarget:
    """Where one checkpoint tensor goes: rows [row_start, row_start + shape[0]) of `param`."""

    param: torch.Tensor
    row_start: int
    shape: tuple[int, ...]


def load_model(
    config: ModelConfig, device: torch.device, kernels: Kernels | None = None
) -> LlamaForCausalLM:
    """Build the model for `config` on `device` and fill it from `config.model`'s safetensors.

    `kernels` defaults to what a default `KernelConfig` resolves to on `device`.
    """
    files = weight_files(Path(config.model))
    if kernels is None:
        kernels = Kernels.choose(KernelConfig(), device, config.dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config, kernels)
    targets = checkpoint_targets(model, config)
    with torch.no_grad():
        loaded = _copy_tensors(files, targets)
    _check_complete(targets, loaded, config)
    model.fold_norm_weights()  # kernels.fold_norms: RMSNorms applied inside one-row GEMVs
    return model.requires_grad_(False).eval()


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model_dir`, from the shard index when there is one."""
    if not model_dir.is_dir():
        raise ValueError(f"model: directory {model_dir} does not exist")
    index = model_dir / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"model: {index} is not a valid safetensors index ({e!r})") from e
        files = [model_dir / name for name in names]
    else:
        files = [model_dir / WEIGHTS_FILE]
    for file in files:
        if not file.is_file():
            raise ValueError(f"model: weights file {file} is missing")
    return files


def checkpoint_targets(model: LlamaForCausalLM, config: ModelConfig) -> dict[str, TensorTarget]:
    """Map each expected Hugging Face tensor name to the model parameter rows it fills.

    A tied `lm_head` shares the embedding and is not expected in the checkpoint.
    """
    q_size = config.num_heads * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    inter = config.intermediate_size
    fused = {
        "qkv_proj": [("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)],
        "gate_up_proj": [("gate_proj", inter), ("up_proj", inter)],
    }
    targets: dict[str, TensorTarget] = {}
    # named_parameters() lists a tied lm_head.weight once, under model.embed_tokens.weight.
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        parent, _, leaf = module.rpartition(".")
        if leaf not in fused:
            targets[name] = TensorTarget(param, 0, tuple(param.shape))
            continue
        row = 0
        for part, rows in fused[leaf]:
            targets[f"{parent}.{part}.{kind}"] = TensorTarget(param, row, (rows, *param.shape[1:]))
            row += rows
    return targets


def _copy_tensors(files: list[Path], targets: dict[str, TensorTarget]) -> set[str]:
    """Copy every known tensor of `files` into its target; returns the names copied."""
    loaded: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    target = targets.get(name)
                    if target is None:
                        continue  # e.g. a tied lm_head or rotary inv_freq buffers
                    _check_shape(name, file, tuple(f.get_slice(name).get_shape()), target.shape)
                    rows = slice(target.row_start, target.row_start + target.shape[0])
                    target.param[rows].copy_(f.get_tensor(name))
                    loaded.add(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"model: cannot read weights file {file}: {e}") from e
    return loaded


def _check_shape(name: str, file: Path, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise ValueError(
            f"model: tensor {name} in {file} has shape {list(shape)}, expected {list(expected)}"
        )


def _check_complete(
    targets: dict[str, TensorTarget], loaded: set[str], config: ModelConfig
) -> None:
    missing = [name for name in targets if name not in loaded]
    if not missing:
        return
    name = missing[0]
    hint = ""
    if name == "lm_head.weight":
        hint = " (tie_word_embeddings is false, so the checkpoint must hold lm_head.weight)"
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise ValueError(
        f"model: tensor {name} with shape {list(targets[name].shape)} is missing from "
        f"{config.model}{hint}{more}"
    )
