"""Model implementations and their loading from local Hugging Face directories."""

from engine.models.llama import LlamaForCausalLM
from engine.models.loader import load_model, load_tokenizer

__all__ = ["LlamaForCausalLM", "load_model", "load_tokenizer"]
