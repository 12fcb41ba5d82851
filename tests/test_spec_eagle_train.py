"""`baton train-speculator --method eagle` (engine.spec_decode.train_eagle): the trained head
loads with `"method": "eagle"` and keeps greedy outputs; the engine's drafts equal the training
module's argmax chain on transformers' states (the training math is the engine's); on a bigram
target (tests.test_spec_eagle) training gets far more drafts accepted than the initial head;
options that do not apply are refused by flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.sampling_params import SamplingParams
from engine import LLM
from engine.request import Request
from engine.sampling_params import SamplingParams as EngineSamplingParams
from engine.spec_decode.train_eagle import new_eagle_head, save_eagle_head
from engine.spec_decode.train_mlp import Target, TrainOptions
from launcher.cli import main as baton
from tests.test_spec_decode import _prompts, _run
from tests.test_spec_eagle import SMALL_CACHE, _spec, _twice, bigram_target, record_drafts

QUICK = ("--method", "eagle", "--stage1-steps", "20", "--stage2-steps", "60",
         "--stage2-prompts", "16", "--seq-len", "24", "--batch-size", "8", "--lr", "1e-2",
         "--threads", "1", "--quiet")  # fmt: skip


def _train(model: Path, out: Path, data: Path) -> Path:
    if not data.exists():
        data.write_text(" ".join(f"item {i % 7} costs {i % 5} coins;" for i in range(300)))
    assert baton(["train-speculator", "--model", str(model), "--out", str(out),
                  "--data", str(data), *QUICK]) == 0  # fmt: skip
    return out


def _acceptance(target: Path, head: Path, prompts, params, expected) -> float:
    llm = LLM(str(target), speculative_config=_spec(head, False), **SMALL_CACHE)
    _twice(llm, prompts, params, expected)
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    return stats.num_accepted_tokens / stats.num_draft_tokens


def _strong_bigram(model: Path, dest: Path) -> Path:
    """A bigram target (tests.test_spec_eagle) whose layer-0 MLP output is 10 times larger: its
    successor of a token is rarely the token itself (the plain one's mostly is, which the
    initial head, g = embed(t), drafts already)."""
    target = bigram_target(model, dest)
    weights = load_file(target / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"] *= 10
    save_file(weights, str(target / "model.safetensors"), {"format": "pt"})
    return target


def test_training_gets_drafts_accepted_on_a_bigram_target(tiny_model, tmp_path):
    """The saved head loads as `eagle`, greedy outputs equal those without drafts (preemption,
    chunked prompts, prefix hits), and it drafts the bigram target far better than it did
    before training (the initial head, saved as is)."""
    target = _strong_bigram(tiny_model("llama"), tmp_path / "target")
    head = _train(target, tmp_path / "head", tmp_path / "data.txt")
    config = json.loads((head / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64
    assert "embed_tokens.weight" not in load_file(head / "model.safetensors")
    options = TrainOptions(model=target, out=tmp_path / "unused", method="eagle")
    untrained = tmp_path / "untrained"
    save_eagle_head(new_eagle_head(options, Target(target)), target, untrained)
    prompts = _prompts(8, seed=2)
    params = _greedy(32)
    expected = _run(LLM(str(target), **SMALL_CACHE), prompts, params)
    trained = _acceptance(target, head, prompts, params, expected)
    before = _acceptance(target, untrained, prompts, params, expected)
    assert trained > 0.4 and trained > 3 * before, (trained, before)  # 0.6 and 0.0 now


def test_engine_drafts_are_the_training_modules(tiny_model, tmp_path):
    """A head trained on a tiny llama (real attention): each step's drafts through the engine
    (chunked prompts, batches) equal the training module's greedy chain over the request's
    tokens and transformers' states (each further draft reads the module's own g)."""
    model = tiny_model("llama")
    head_dir = _train(model, tmp_path / "head", tmp_path / "data.txt")
    llm = LLM(str(model), speculative_config=_spec(head_dir, False), max_num_batched_tokens=8)
    seen, _, propose = record_drafts(llm)
    expected = _run(LLM(str(model)), _prompts(3, seed=5), _greedy(10))
    assert _run(llm, _prompts(3, seed=5), _greedy(10)) == expected
    target = Target(model)
    head = new_eagle_head(TrainOptions(model=model, out=tmp_path, method="eagle"), target)
    head.load_state_dict(load_file(head_dir / "model.safetensors"))
    assert len(seen) > 5
    for tokens, drafts in seen[::2]:
        assert _chain(head, tokens, target.hidden_of([tokens[:-1]])[0], len(drafts)) == drafts
    request = Request("fresh", seen[0][0], EngineSamplingParams(), 1)  # the states' convention
    request.spec_states = [(0, target.hidden_of([seen[0][0][:-1]])[0])]
    assert propose([request], [len(seen[0][1])]) == [seen[0][1]]


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@torch.no_grad()
def _chain(head, tokens: list[int], states: torch.Tensor, k: int) -> list[int]:
    """k drafts: row i reads (t(i+1), h_i); each draft's row reads (the draft, the g before)."""
    ids, rows, out = torch.tensor(tokens[1:]), states, []
    for _ in range(k):
        g = head(ids[None], rows[None])[0, -1]  # (H,) the last row's state
        draft = int(head.logits(g).argmax())
        out.append(draft)
        ids, rows = torch.cat([ids, torch.tensor([draft])]), torch.cat([rows, g[None]])
    return out


@pytest.mark.parametrize(("flags", "message"), [
    (["--tie-weights"], "--tie-weights: MLP speculator options, not for --method eagle"),
    (["--n-predict", "2"], "--n-predict: MLP speculator options"),
    (["--inner-dim", "32", "--n-predict", "3"], "--n-predict, --inner-dim: MLP speculator"),
])  # fmt: skip
def test_options_that_do_not_apply_are_refused(tiny_model, tmp_path, capsys, flags, message):
    model = str(tiny_model("llama"))
    assert baton(["train-speculator", "--model", model, "--out", str(tmp_path),
                  "--method", "eagle", *flags]) == 2  # fmt: skip
    assert message in capsys.readouterr().err


def test_options_check_the_method(tmp_path):
    with pytest.raises(ValueError, match="--tie-weights does not apply to --method eagle"):
        TrainOptions(model=tmp_path, out=tmp_path, method="eagle", tie_weights=True).check()
    with pytest.raises(ValueError, match="--inner-dim does not apply to --method eagle"):
        TrainOptions(model=tmp_path, out=tmp_path, method="eagle", inner_dim=32).check()
    with pytest.raises(ValueError, match="--method must be one of mlp_speculator, eagle"):
        TrainOptions(model=tmp_path, out=tmp_path, method="medusa").check()
