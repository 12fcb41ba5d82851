"""Baton's Llama-family model and loader against transformers, over a paged KV cache (CPU)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.layers.rotary import rope_inv_freq
from engine.models import LlamaForCausalLM, load_model, load_tokenizer

TinyModelFactory = Callable[..., Path]
VARIANTS = ("llama", "llama-linear", "qwen2", "qwen3", "mistral")
TOLERANCE = 1e-4  # max |logit difference| against transformers in float32
BLOCK_SIZE = 16  # tokens
NUM_BLOCKS = 64
MAX_DIFFS: dict[str, float] = {}


class PagedKV:
    """The model runner's job in miniature: block tables, slot mapping and per-layer caches.

    Blocks are handed out in a scrambled order so a sequence's blocks are not contiguous.
    """

    def __init__(self, config: ModelConfig) -> None:
        shape = (2, NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
        self.caches = [torch.zeros(shape, dtype=config.dtype) for _ in range(config.num_layers)]
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}  # tokens already in the cache

    def step(
        self, model: LlamaForCausalLM, chunks: dict[int, list[int]]
    ) -> dict[int, torch.Tensor]:
        """Run one forward pass over the new tokens of each sequence: seq id -> (n, vocab)."""
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        for seq, tokens in chunks.items():
            start = self.lens.get(seq, 0)
            end = start + len(tokens)
            table = self.tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < end:
                table.append(self.free.pop())
            pos = list(range(start, end))
            ids += tokens
            positions += pos
            slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in pos]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            tables.append(torch.tensor(table))
            self.lens[seq] = end
        meta = AttentionMetadata(torch.tensor(slots), starts, seq_lens, tables)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(positions), self.caches, meta)
            logits = model.compute_logits(hidden)  # (T, vocab)
        return {seq: logits[starts[i] : starts[i + 1]] for i, seq in enumerate(chunks)}


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _make_variant(tiny_model: TinyModelFactory, variant: str, tmp: Path) -> Path:
    """A tiny model directory; "llama-linear" is llama with linear rope scaling instead."""
    if variant != "llama-linear":
        return tiny_model(variant)
    target = _copy_model(tiny_model("llama"), tmp / "llama-linear")
    config = json.loads((target / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tiny_model, tmp_path_factory):
    """(variant, our model, transformers' model, our config) for one tiny model variant."""
    model_dir = _make_variant(tiny_model, request.param, tmp_path_factory.mktemp("variant"))
    config = ModelConfig.from_pretrained(model_dir)
    ours = load_model(config, torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return request.param, ours, theirs, config


def _reference(theirs, tokens: list[int]) -> torch.Tensor:  # (L, vocab)
    with torch.inference_mode():
        return theirs(torch.tensor([tokens])).logits[0].float()


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check(variant: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (ours - ref).abs().max().item()
    MAX_DIFFS[variant] = max(MAX_DIFFS.get(variant, 0.0), diff)
    assert diff < TOLERANCE, f"{variant}: max |logit diff| {diff:.2e}"


def test_prefill_in_one_pass_matches_transformers(pair):
    variant, ours, theirs, config = pair
    tokens = _tokens(100, seed=1)  # longer than mistral's 48-token window
    logits = PagedKV(config).step(ours, {0: tokens})[0]
    _check(variant, logits, _reference(theirs, tokens))


def test_chunked_prefill_then_decode_matches_transformers(pair):
    variant, ours, theirs, config = pair
    tokens = _tokens(100, seed=2)
    kv = PagedKV(config)
    steps = [kv.step(ours, {0: tokens[:60]})[0]]
    steps.append(kv.step(ours, {0: tokens[60:]})[0])  # attends to the cached first chunk
    for _ in range(3):  # greedy decode, one token per step
        tokens.append(int(steps[-1][-1].argmax()))
        steps.append(kv.step(ours, {0: tokens[-1:]})[0])
    ref = _reference(theirs, tokens)  # (103, vocab)
    _check(variant, torch.cat(steps), ref)
    assert tokens[100:] == ref[99:102].argmax(-1).tolist()  # transformers' greedy choices


def test_ragged_batch_matches_transformers(pair):
    variant, ours, theirs, config = pair
    prompts = {7: _tokens(100, seed=3), 3: _tokens(37, seed=4), 5: _tokens(5, seed=5)}
    kv = PagedKV(config)
    prefill = kv.step(ours, prompts)
    nxt = {seq: [int(logits[-1].argmax())] for seq, logits in prefill.items()}
    decode = kv.step(ours, nxt)  # a batch of three decodes at different positions
    for seq, prompt in prompts.items():
        ref = _reference(theirs, prompt + nxt[seq])
        _check(variant, torch.cat([prefill[seq], decode[seq]]), ref)


def test_mixed_prefill_and_decode_batch_matches_transformers(pair):
    variant, ours, theirs, config = pair
    a, b = _tokens(60, seed=6), _tokens(70, seed=7)
    kv = PagedKV(config)
    kv.step(ours, {0: a})
    out = kv.step(ours, {0: [11], 1: b[:50]})  # one decode beside a prefill chunk
    out2 = kv.step(ours, {1: b[50:], 0: [12]})
    _check(variant, torch.cat([out[0], out2[0]]), _reference(theirs, a + [11, 12])[60:])
    _check(variant, torch.cat([out[1], out2[1]]), _reference(theirs, b))


def test_sliding_window_matters_for_mistral(tiny_model):
    """Guards the mistral comparison above: without the window the logits would differ."""
    config = ModelConfig.from_pretrained(tiny_model("mistral"))
    assert config.sliding_window == 48
    tokens = _tokens(100, seed=1)
    windowed = PagedKV(config).step(load_model(config, torch.device("cpu")), {0: tokens})[0]
    full_config = dataclasses.replace(config, sliding_window=None)
    full = PagedKV(full_config).step(load_model(full_config, torch.device("cpu")), {0: tokens})[0]
    assert torch.equal(windowed[:48], full[:48])
    assert (windowed[48:] - full[48:]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    ],
)
def test_rope_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
    hf = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters=params)
    if scaling is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, torch.device("cpu"))
    assert torch.equal(rope_inv_freq(128, 500000.0, scaling), expected)


def test_bfloat16_model_runs_close_to_float32(tiny_model):
    config = ModelConfig.from_pretrained(tiny_model("qwen3"), dtype="bfloat16")
    model = load_model(config, torch.device("cpu"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary.cos_sin.dtype == torch.bfloat16
    tokens = _tokens(40, seed=8)
    logits = PagedKV(config).step(model, {0: tokens})[0]
    assert logits.dtype == torch.float32
    ref_config = dataclasses.replace(config, dtype=torch.float32)
    ref = PagedKV(ref_config).step(load_model(ref_config, torch.device("cpu")), {0: tokens})[0]
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.8


def test_tied_lm_head_shares_the_embedding(tiny_model):
    tied = load_model(ModelConfig.from_pretrained(tiny_model("qwen2")), torch.device("cpu"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = load_model(ModelConfig.from_pretrained(tiny_model("llama")), torch.device("cpu"))
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


# --- loader errors and checkpoint layouts ------------------------------------------------------


def test_sharded_checkpoint_loads_like_a_single_file(tiny_model, tmp_path):
    src = tiny_model("qwen3")
    dst = _copy_model(src, tmp_path / "sharded")
    weights = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(dst / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    single = load_model(ModelConfig.from_pretrained(src), torch.device("cpu")).state_dict()
    sharded = load_model(ModelConfig.from_pretrained(dst), torch.device("cpu")).state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
    (dst / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is missing"):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


def test_missing_directory_is_a_value_error(tiny_model, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="nowhere"):
        ModelConfig.from_pretrained(missing)
    config = dataclasses.replace(
        ModelConfig.from_pretrained(tiny_model("llama")), model=str(missing)
    )
    with pytest.raises(ValueError, match=f"directory {missing} does not exist"):
        load_model(config, torch.device("cpu"))


def test_missing_weights_file_is_a_value_error(tiny_model, tmp_path):
    dst = _copy_model(tiny_model("llama"), tmp_path / "m")
    (dst / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


def test_missing_tensor_is_named_with_its_shape(tiny_model, tmp_path):
    dst = _copy_model(tiny_model("llama"), tmp_path / "m")
    weights = load_file(str(dst / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(dst / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"model.layers.1.mlp.up_proj.weight with shape \[128, 64\]"
    ):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


def test_untied_model_without_lm_head_is_a_value_error(tiny_model, tmp_path):
    dst = _copy_model(tiny_model("mistral"), tmp_path / "m")
    weights = load_file(str(dst / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings is false"):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


def test_misshaped_tensor_is_named_with_both_shapes(tiny_model, tmp_path):
    dst = _copy_model(tiny_model("qwen2"), tmp_path / "m")
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(48)
    save_file(weights, str(dst / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"k_proj.bias in .*model.safetensors has shape \[48\], expected \[32\]"
    ):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_file_is_a_value_error(tiny_model, tmp_path, damage):
    dst = _copy_model(tiny_model("llama"), tmp_path / "m")
    file = dst / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read weights file .*model.safetensors"):
        load_model(ModelConfig.from_pretrained(dst), torch.device("cpu"))


def test_unsupported_architecture_is_named(tiny_model, tmp_path):
    dst = _copy_model(tiny_model("llama"), tmp_path / "m")
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_pretrained(dst)


def test_load_tokenizer(tiny_model, tmp_path):
    tokenizer = load_tokenizer(tiny_model("qwen2"))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    dst = _copy_model(tiny_model("qwen2"), tmp_path / "m")
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(dst)


def test_report_max_logit_differences():
    """Prints the max |logit diff| per variant seen above (run with -s to see it)."""
    for variant, diff in sorted(MAX_DIFFS.items()):
        print(f"max |logit diff| vs transformers, {variant}: {diff:.2e}")
    assert all(diff < TOLERANCE for diff in MAX_DIFFS.values())
