"""Tiny random-weight Hugging Face models for tests: no model hub needed.

`make_tiny_model(path, arch, seed)` writes a complete model directory (config, safetensors
weights, generation config, a byte-level BPE tokenizer trained here on an embedded corpus, and
a ChatML chat template that renders tools) that both transformers and Baton's loader can read.
Each architecture exercises one feature of the Llama family:

    llama    llama3 rope scaling, untied embeddings
    qwen2    bias on q/k/v, tied embeddings
    qwen3    q/k RMSNorm, head_dim (32) != hidden_size / num_heads (16), tied embeddings
    mistral  sliding-window attention (window 48 tokens), untied embeddings

Weights are drawn from a seeded `torch.Generator`, so the same (arch, seed) gives byte-identical
files. Their scales make the next-token distribution peaked (a wide gap between the top two
logits), so greedy decoding is robust to float rounding and tests can compare tokens exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
VOCAB_SIZE = 512
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 4096
SLIDING_WINDOW = 48  # tokens; small so tests cross it

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small engine reads the prompt, splits it into \
tokens, and writes one new token at a time. Each step looks back at every token it has seen \
before, so the cache of keys and values grows with the text.
Once upon a time there was a little town by the sea. The people of the town woke up early, \
went out in their boats, and came back in the evening with fish, bread, and stories. Children \
played on the beach while their parents talked about the weather, the wind, and the price of salt.
Hello! How are you today? I am fine, thank you. What would you like to know? Please tell me \
about the history of numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 3.14159 2.71828.
Dates and times look like 2024-01-31, 12:30, and 7:45 pm; prices look like $19.99 or 5%.
Lists use commas, semicolons; colons: and (brackets), [square brackets], {braces} and "quotes".
A function call such as get_weather(city="Paris", unit="celsius") returns {"temp": 21}.
The user asked a question and the assistant gave an answer. The system said: be helpful, be \
honest, and be brief. Then the tool returned a result, and the assistant wrote a summary.
Water boils at 100 degrees and freezes at 0 degrees. The sun rises in the east and sets in the \
west. There are seven days in a week, twelve months in a year, and sixty minutes in an hour.
"""

CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{%- if call.arguments is string %}{{- call.arguments }}
{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def make_tiny_model(
    path: Path, arch: str, seed: int = 0, added_tokens: Sequence[str] = ()
) -> Path:
    """Write a tiny `arch` model with weights drawn from `seed` into `path`; returns `path`.

    `added_tokens` become single regular (non-special) tokens at the end of the vocabulary,
    as Qwen's `<tool_call>` and `</think>` are; the vocabulary keeps VOCAB_SIZE tokens (BPE
    learns that many fewer merges), so without them the model is the same as ever."""
    if arch not in TINY_MODEL_ARCHS:
        raise ValueError(
            f"unknown tiny model arch {arch!r}; choose one of {', '.join(TINY_MODEL_ARCHS)}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = _hf_config(arch)
    _write_json(path / "config.json", config)
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    _write_json(path / "generation_config.json", {"eos_token_id": eos, "pad_token_id": 0})
    save_file(_random_weights(config, seed), str(path / "model.safetensors"), {"format": "pt"})
    _save_tokenizer(path, added_tokens)
    return path


def _hf_config(arch: str) -> dict[str, Any]:
    """config.json contents for `arch` (transformers' field names)."""
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    config: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HIDDEN_SIZE // NUM_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": 0,
        "use_cache": True,
        "dtype": "float32",
    }
    config.update(_ARCH_CONFIGS[arch])
    return config


_ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 512,
        },
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": NUM_LAYERS,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 32,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": NUM_LAYERS,
    },
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "tie_word_embeddings": False,
        "sliding_window": SLIDING_WINDOW,
    },
}


def _random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Hugging Face-named float32 weights drawn from `seed`, scaled for peaked outputs."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_size = config["num_attention_heads"] * config["head_dim"]
    kv_size = config["num_key_value_heads"] * config["head_dim"]
    arch = config["model_type"]
    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = normal(hidden, std=0.2, mean=1.0)
        weights[p + "post_attention_layernorm.weight"] = normal(hidden, std=0.2, mean=1.0)
        for name, rows in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            gain = 1.0 if name == "v_proj" else 1.5  # sharper attention: more use of context
            weights[p + f"self_attn.{name}.weight"] = normal(rows, hidden, std=gain * hidden**-0.5)
            if arch == "qwen2":  # a small v bias: it adds the same vector at every position
                std = 0.02 if name == "v_proj" else 0.3
                weights[p + f"self_attn.{name}.bias"] = normal(rows, std=std)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_size, std=2 * q_size**-0.5)
        if arch == "qwen3":
            weights[p + "self_attn.q_norm.weight"] = normal(config["head_dim"], std=0.3, mean=1.0)
            weights[p + "self_attn.k_norm.weight"] = normal(config["head_dim"], std=0.3, mean=1.0)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden, std=hidden**-0.5)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter, std=2 * inter**-0.5)
    # The residual stream carries the input token's embedding, so an lm_head near the
    # embedding plus a final norm of negative mean makes a token unlikely to predict itself.
    weights["model.norm.weight"] = normal(hidden, std=0.5, mean=-0.25)
    if not config["tie_word_embeddings"]:
        embed = weights["model.embed_tokens.weight"]
        weights["lm_head.weight"] = embed + normal(config["vocab_size"], hidden, std=1.0)
    return weights


def _train_tokenizer(added_tokens: Sequence[str] = ()) -> Tokenizer:
    """Byte-level BPE (any text round-trips) with exactly VOCAB_SIZE tokens, specials first,
    `added_tokens` last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(added_tokens),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, special=False) for token in added_tokens])
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"tiny tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}: "
            "the embedded corpus is too small"
        )
    return tokenizer


def _save_tokenizer(path: Path, added_tokens: Sequence[str] = ()) -> None:
    """Write tokenizer.json, tokenizer_config.json and the chat template into `path`."""
    from transformers import PreTrainedTokenizerFast  # slow import, only needed here

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(added_tokens),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(path))


def _write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
