"""transformers as the reference implementation for the engine's outputs."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


@cache
def hf_model(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy `generate` for one prompt, never stopping at eos."""
    ids = torch.tensor([prompt])
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        out = hf_model(model_dir).generate(
            ids, attention_mask=torch.ones_like(ids), generation_config=config
        )
    return out[0, len(prompt) :].tolist()


def hf_logprobs(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position: (L, vocab) float32."""
    with torch.inference_mode():
        logits = hf_model(model_dir)(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)
