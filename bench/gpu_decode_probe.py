"""A first GPU probe (issue 7, not its full benchmark): batch-1 decode on a Llama-3.2-1B-shaped
random-weight model in bfloat16, Baton's engine against transformers `generate`, same run.

Reports tokens/s for both and the roofline (measured device copy bandwidth / weight bytes).
No CUDA graphs yet, so Baton's number here is launch-bound like transformers'.

    python -m bench.gpu_decode_probe [--out bench/results/gpu_decode_probe.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe_machine

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


def make_model(directory: Path) -> Path:
    """A random Llama-3.2-1B-shaped model (bf16) with a tiny model's tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.tiny_model import make_tiny_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(directory)
    tiny = make_tiny_model(directory / "tok", "llama", 0)
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, directory / f.name)
    return directory


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - start)


def baton_decode(model_dir: Path, new_tokens: int) -> float:
    from engine import LLM, SamplingParams

    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_memory_bytes=4 << 30)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([[100] * 16], SamplingParams(max_tokens=4), use_tqdm=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([[100] * 16], params, use_tqdm=False)
    torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def hf_decode(model_dir: Path, new_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    ids = torch.full((1, 16), 100, device="cuda")
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, generation_config=config)
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_decode_probe.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        bandwidth = copy_bandwidth()
        baton = baton_decode(model_dir, args.new_tokens)
        hf = hf_decode(model_dir, args.new_tokens)
    roofline = bandwidth / weight_bytes
    result = {
        "benchmark": "gpu_decode_probe",
        "model": {"shape": SHAPE, "dtype": "bfloat16", "weight_bytes": weight_bytes},
        "new_tokens": args.new_tokens,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "roofline_tokens_per_s": roofline,
        "baton_tokens_per_s": baton,
        "transformers_tokens_per_s": hf,
        "baton_fraction_of_roofline": baton / roofline,
        "baton_over_transformers": baton / hf,
        "machine": describe_machine(),
        "command": "python -m bench.gpu_decode_probe",
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
