"""Briefly trained tiny models: confident next-token predictions without a model hub.

The random-weight tiny models (engine/models/tiny.py) have near-tied logits at many
positions, so comparisons across float formats flip on rounding alone. `train_tiny_model`
trains one for a few hundred steps on a synthetic language whose next token follows from
context, arithmetic progressions modulo MODULUS:

    token i = FIRST_TOKEN + (s + i*d) % MODULUS, for a start s and a step d in [1, MAX_STEP]

Predicting token i + 1 needs tokens i and i - 1, so attention (a previous-token head, through
RoPE) is load-bearing. After training the model continues progressions with top-1 probability
near 1, so its argmax does not move under bf16 rounding. `synthetic_prompts` draws prompts from
the same language. Both are deterministic given their seed.

(A second pattern, repeating a random motif, needs an induction head; that takes a couple of
thousand steps to form at this size, far more than the few hundred these models get.)
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

FIRST_TOKEN = 3  # ids 0..2 are the tiny tokenizer's special tokens
MODULUS = 500  # token ids stay in [3, 503), below the tiny models' vocab_size (512)
MAX_STEP = 12
MIN_PROMPT, MAX_PROMPT = 8, 120
SEQ_LEN = 160  # covers the longest prompt plus 32 generated tokens: no unseen positions
BATCH = 32
LR = 1e-2

# Written by save_pretrained; everything else in the source directory (tokenizer files,
# chat template, generation config) is copied over unchanged.
_MODEL_FILES = {"config.json", "model.safetensors"}


def _sequences(gen: torch.Generator, count: int, length: int) -> torch.Tensor:
    """(count, length) arithmetic progressions of the synthetic language."""
    start = torch.randint(0, MODULUS, (count, 1), generator=gen)
    step = torch.randint(1, MAX_STEP + 1, (count, 1), generator=gen)
    return FIRST_TOKEN + (start + torch.arange(length) * step) % MODULUS


def synthetic_prompts(n: int, seed: int) -> list[list[int]]:
    """`n` prompts of MIN_PROMPT..MAX_PROMPT tokens (both ends included) to continue."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [MIN_PROMPT, MAX_PROMPT][:n]
    more = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (max(0, n - 2),), generator=gen)
    lengths += more.tolist()
    return [_sequences(gen, 1, length)[0].tolist() for length in lengths]


def train_tiny_model(
    src_dir: Path,
    dst_dir: Path,
    steps: int = 300,
    device: str = "cpu",
    seed: int = 0,
    *,
    losses: list[float] | None = None,
) -> Path:
    """Train the tiny model at `src_dir` on the synthetic language; save it to `dst_dir`.

    The architecture and config come from `src_dir`, but the weights are redrawn from `seed`
    at the usual scale (normal, std config.initializer_range; norms 1): the tiny models'
    deliberately large random weights saturate the softmax and barely train. Training is
    float32 AdamW with warmup and cosine decay. The result (float32 weights plus the source's
    tokenizer, chat template and generation config) loads in transformers and Baton alike.
    Each step's loss is appended to `losses` when given. Returns `dst_dir`.
    """
    from transformers import AutoModelForCausalLM

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    assert model.config.vocab_size >= FIRST_TOKEN + MODULUS, model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied embeddings appear once
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.to(device).train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    for _ in range(steps):
        ids = _sequences(gen, BATCH, SEQ_LEN).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if losses is not None:
            losses.append(loss.item())

    dst_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").save_pretrained(dst_dir)
    for file in src_dir.iterdir():
        if file.is_file() and file.name not in _MODEL_FILES:
            shutil.copy2(file, dst_dir / file.name)
    return dst_dir
