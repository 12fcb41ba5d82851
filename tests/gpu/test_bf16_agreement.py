"""The engine in bfloat16 on a GPU agrees with transformers in bfloat16, token by token.

The random-weight tiny models have near-tied logits at many positions, where bf16 rounding alone
picks the argmax (transformers-bf16 disagrees with transformers-fp32 there as often as Baton
does). So each tiny model is first trained briefly on a synthetic language (tests/trained_model:
arithmetic progressions), which makes its predictions confident, as a real model's are.

bf16 rounding differs between Baton's kernels and transformers', so exact equality of whole
greedy continuations is too strict: one early flip changes everything after it. Agreement is
measured teacher-forced instead: transformers reads each prompt followed by Baton's output, and
at every generated position its argmax is compared with Baton's token. The failure message also
says how many disagreements are near-ties, how often Baton and transformers-bf16 each agree
with transformers in float32 on the same positions (how far bf16 alone moves the argmax), and
how confident the trained model is (its final training loss and mean top-1 probability).
"""

from __future__ import annotations

import pytest
import torch

from tests.trained_model import synthetic_prompts, train_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEW_TOKENS = 32
MIN_AGREEMENT = 0.99
NEAR_TIE = 1e-2  # relative logit gap under which a disagreement is a near-tie


def generated_logits(model, prompt: list[int], out: list[int]) -> torch.Tensor:
    """(len(out), vocab) float32 logits of `model` at the positions that predicted `out`."""
    ids = torch.tensor([prompt + out], device="cuda")
    with torch.inference_mode():
        logits = model(ids).logits[0].float()  # (T, vocab)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(out)]  # row t predicts token t + 1


# The Triton path's fusions and PDL off (KernelConfig): gate/up by cuBLAS and silu_mul, norms
# and adds as kernels of their own, plain launches.
UNFUSED = {"fuse_gate_up": False, "fold_norms": False, "pdl": False}


@pytest.fixture()
def pdl_setting():
    """An engine sets PDL for the whole process: give later tests back the setting."""
    from baton_kernels import pdl

    previous = pdl.set_enabled(True)
    yield
    pdl.set_enabled(previous)


@pytest.mark.parametrize(
    "arch,batched,switches",
    [(arch, batched, {}) for arch in ("llama", "qwen3") for batched in (True, False)]
    + [("llama", False, UNFUSED), ("qwen3", False, UNFUSED)],
)  # batched False: one request at a time, batch-1 decode steps through the one-row GEMVs
# that apply the folded RMSNorms themselves (or, UNFUSED, the separate kernels)
@pytest.mark.usefixtures("pdl_setting")
def test_bf16_greedy_agrees_with_transformers_teacher_forced(
    tiny_model, tmp_path, arch, batched, switches
):
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    losses: list[float] = []
    model_dir = tiny_model(arch)
    model_dir = train_tiny_model(model_dir, tmp_path / "trained", device="cuda", losses=losses)
    prompts = synthetic_prompts(8, seed=0)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", kv_cache_memory_bytes=1 << 28,
              **switches)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    runner = llm.engine.core.runner
    assert runner.kernels.describe() == {"kernel_backend": "triton", "fuse_gate_up": True,
                                         "fold_norms": True, "pdl": runner.kernels.pdl,
                                         **switches}  # fmt: skip
    folded = [layer.norms_folded for layer in runner.model.model.layers]
    assert all(folded) == switches.get("fold_norms", True)  # bf16 on the GPU: folded at load
    if batched:
        results = llm.generate(prompts, params, use_tqdm=False)
    else:
        results = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    outputs = [list(o.outputs[0].token_ids) for o in results]
    assert all(len(o) == NEW_TOKENS for o in outputs)

    hf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    hf32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    total = agree = near_ties = baton_fp32 = hf16_fp32 = 0
    top_prob = 0.0
    for prompt, out in zip(prompts, outputs, strict=True):
        rows = generated_logits(hf16, prompt, out)  # (NEW_TOKENS, vocab)
        best = rows.argmax(dim=-1)
        baton = torch.tensor(out, device="cuda")
        same = best == baton
        total += len(out)
        agree += int(same.sum())
        # How far Baton's token is below transformers' top logit, relative to that logit.
        top = rows.gather(1, best[:, None])[:, 0]
        chosen = rows.gather(1, baton[:, None])[:, 0]
        gap = (top - chosen) / top.abs().clamp_min(1e-6)
        near_ties += int(((~same) & (gap < NEAR_TIE)).sum())
        rows32 = generated_logits(hf32, prompt, out)
        best32 = rows32.argmax(dim=-1)
        baton_fp32 += int((baton == best32).sum())
        hf16_fp32 += int((best == best32).sum())
        top_prob += float(rows32.softmax(dim=-1).amax(dim=-1).sum())

    agreement = agree / total
    summary = (
        f"{arch}, {'batched' if batched else 'one at a time'}{', unfused' if switches else ''}: "
        f"bf16 agreement with transformers-bf16 {agreement:.4f} ({agree}/{total}); "
        f"{near_ties} of {total - agree} disagreements are near-ties (gap < {NEAR_TIE} "
        f"relative); against transformers-fp32 argmax: Baton {baton_fp32}/{total}, "
        f"transformers-bf16 {hf16_fp32}/{total}; trained model: final loss {losses[-1]:.3f}, "
        f"mean fp32 top-1 probability {top_prob / total:.3f}"
    )
    print(summary)
    assert agreement >= MIN_AGREEMENT, summary
    llm.check_integrity()
