"""The tiny test models: loadable by transformers, deterministic, peaked, with a chat template."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from engine.models.tiny import TINY_MODEL_ARCHS, make_tiny_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_unknown_arch_lists_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="gpt2.*llama, qwen2, qwen3, mistral"):
        make_tiny_model(tmp_path, "gpt2")


@pytest.mark.parametrize("arch", TINY_MODEL_ARCHS)
def test_loads_in_transformers_and_decodes_peaked_varied_text(tiny_model, arch):
    model_dir = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (
        type(model).__name__
        == json.loads((model_dir / "config.json").read_text())["architectures"][0]
    )
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (
        model.config.eos_token_id
        == tokenizer.eos_token_id
        == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    prompts = torch.randint(3, 512, (8, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(prompts).logits  # (8, 24, vocab)
        config = GenerationConfig(max_new_tokens=24, do_sample=False, eos_token_id=None)
        out = model.generate(
            prompts, attention_mask=torch.ones_like(prompts), generation_config=config
        )[:, 24:]
    top2 = logits.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]
    assert gap.median() > 0.5  # float rounding (~1e-5) cannot flip a typical argmax
    assert (gap > 1e-2).float().mean() > 0.97
    first_tokens = out[:, :4]  # no immediate collapse into one repeated token
    assert (first_tokens[:, 1:] != first_tokens[:, :-1]).all()
    assert sum(len(set(row)) for row in out.tolist()) / len(out) >= 12  # of 24 tokens


def test_arch_features_are_present(tiny_model):
    def load(arch: str) -> tuple[dict, dict[str, torch.Tensor]]:
        model_dir = tiny_model(arch)
        config = json.loads((model_dir / "config.json").read_text())
        return config, load_file(str(model_dir / "model.safetensors"))

    llama, llama_w = load("llama")
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    assert not llama["tie_word_embeddings"] and "lm_head.weight" in llama_w
    qwen2, qwen2_w = load("qwen2")
    assert qwen2["tie_word_embeddings"] and "lm_head.weight" not in qwen2_w
    assert all(qwen2_w[f"model.layers.0.self_attn.{p}_proj.bias"].abs().min() > 0 for p in "qkv")
    qwen3, qwen3_w = load("qwen3")
    assert qwen3["head_dim"] == 32 != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    assert qwen3_w["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert not torch.allclose(qwen3_w["model.layers.0.self_attn.k_norm.weight"], torch.ones(32))
    mistral, _ = load("mistral")
    assert mistral["sliding_window"] == 48
    assert all(w.dtype == torch.float32 for w in llama_w.values())


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    start = time.perf_counter()
    a = make_tiny_model(tmp_path / "a", "qwen3", seed=3)
    b = make_tiny_model(tmp_path / "b", "qwen3", seed=3)
    c = make_tiny_model(tmp_path / "c", "qwen3", seed=4)
    assert time.perf_counter() - start < 6.0  # < 2 s per model
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        files
    )
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_generation_config_names_eos(tiny_model):
    model_dir = tiny_model("llama")
    generation = GenerationConfig.from_pretrained(model_dir)
    assert generation.eos_token_id == 2


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model("llama"))


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        'Ünïcödé, emoji 🎉 and 中文 and $19.99 at 12:30; {"json": [1, 2]}',
        "",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < 512 for i in ids)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    for i, token in enumerate(("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
        assert tokenizer.encode(token, add_special_tokens=False) == [i]
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_renders_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False)
    assert no_prompt == "<|im_start|>user\nHi!<|im_end|>\n"


def test_chat_template_renders_tools_calls_and_results(tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'},
                },
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"temp": 25}'},
    ]
    text = tokenizer.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    system, rest = text.split("<|im_end|>\n", 1)
    assert system.startswith("<|im_start|>system\n")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n"
        '<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 25}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
