"""The MLP speculator (engine.spec_decode.mlp_speculator) and `baton train-speculator`: a
checkpoint written by hand in IBM's fms layout drafts what a step-by-step computation from its
weights gives (tie_weights, scale_input, inner_dim, a "speculator." prefix, pytorch_model.bin);
bad checkpoints are refused naming the key; speculators trained for a few steps keep greedy
outputs identical on the four tiny architectures (preemption, prefix hits); training is
deterministic; a speculator trained on repetitive text gets drafts accepted."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer
from engine import LLM
from engine.config import ModelConfig, SpeculativeConfig
from engine.request import Request
from engine.spec_decode import DrafterContext, build_proposer
from engine.spec_decode.train_mlp import TrainOptions, stage2_prompts, train_speculator
from launcher.cli import main as baton
from tests.test_spec_decode import _prompts, _run

QUICK = ("--stage1-steps", "6", "--stage2-steps", "4", "--stage2-prompts", "4", "--seq-len",
         "16", "--batch-size", "4", "--threads", "1", "--quiet")  # fmt: skip


def _fms_weights(vocab: int, emb_dim: int, inner: int, n: int, tied: bool, seed: int):
    """Random weights under fms' names (tied: index 0 and proj.1 only)."""
    gen = torch.Generator().manual_seed(seed)
    heads = 1 if tied else n
    weights = {}
    for i in range(heads):
        weights[f"emb.{i}.weight"] = torch.randn(vocab, inner, generator=gen)
        weights[f"head.{i}.weight"] = torch.randn(vocab, inner, generator=gen) / inner**0.5
        weights[f"ln.{i}.weight"] = 1 + 0.3 * torch.randn(inner, generator=gen)
        weights[f"ln.{i}.bias"] = 0.3 * torch.randn(inner, generator=gen)
    for i in range(2 if tied else n):
        size = emb_dim if i == 0 else inner
        weights[f"proj.{i}.weight"] = torch.randn(inner, size, generator=gen) / size**0.5
    return weights


def _write_checkpoint(path: Path, config: dict, weights: dict, bin_file: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(weights, path / "pytorch_model.bin")
    else:
        save_file(weights, str(path / "model.safetensors"))
    return path


def _by_hand(weights: dict, config: dict, hidden: torch.Tensor, last: int) -> list[int]:
    """The fms recipe step by step, from the raw tensors: the oracle."""
    n, inner = config["n_predict"], config["inner_dim"] or config["emb_dim"]
    state_w = 0.5 ** (0.5 / n)
    emb_w = math.sqrt(1 - state_w**2) * math.sqrt(inner / 2)

    def w(kind: str, i: int, suffix: str = "weight") -> torch.Tensor:
        if config["tie_weights"]:
            i = min(i, 1) if kind == "proj" else 0
        return weights[f"{kind}.{i}.{suffix}"]

    state = hidden
    if config["scale_input"]:
        state = state / torch.sqrt(state.pow(2).mean() + 1e-6) / math.sqrt(2)
    token, out = last, []
    for i in range(n):
        x = w("proj", i) @ state * state_w + w("emb", i)[token] * emb_w
        x = x / torch.sqrt(x.pow(2).mean() + 1e-6) * w("ln", i) + w("ln", i, "bias")
        state = F.gelu(x)
        token = int((w("head", i) @ state).argmax())
        out.append(token)
    return out


def _context(model_dir: Path) -> DrafterContext:
    config = ModelConfig.from_pretrained(model_dir)
    return DrafterContext(config, torch.device("cpu"), config.dtype)


def _request(tokens: list[int], hidden: torch.Tensor | None) -> Request:
    request = Request("r", tokens, SamplingParams(temperature=0), max_tokens=10)
    request.spec_hidden = hidden
    return request


@pytest.mark.parametrize(
    ("tied", "scale_input", "inner_dim", "prefix", "bin_file"),
    [(False, False, 0, "", False), (True, True, 48, "speculator.", False),
     (False, True, 32, "", True), (True, False, 0, "", True)],
)  # fmt: skip
def test_drafts_follow_the_fms_recipe(tiny_model, tmp_path, tied, scale_input, inner_dim,
                                      prefix, bin_file):  # fmt: skip
    model_dir = tiny_model("llama")
    target = ModelConfig.from_pretrained(model_dir)
    vocab, emb_dim, n = target.vocab_size, target.hidden_size, 4
    config = {"vocab_size": vocab, "emb_dim": emb_dim, "inner_dim": inner_dim, "n_predict": n,
              "top_k_tokens_per_head": [4, 3, 2, 2], "n_candidates": 5, "tie_weights": tied,
              "scale_input": scale_input}  # fmt: skip
    weights = _fms_weights(vocab, emb_dim, inner_dim or emb_dim, n, tied, seed=1)
    spec_dir = _write_checkpoint(
        tmp_path / "spec", config, {prefix + k: v for k, v in weights.items()}, bin_file
    )
    spec = SpeculativeConfig.from_dict({"method": "mlp_speculator", "model": str(spec_dir)})
    assert spec.num_speculative_tokens == n  # vLLM's default: the speculator's n_predict
    proposer = build_proposer(spec, _context(model_dir))
    gen = torch.Generator().manual_seed(2)
    hidden = [torch.randn(emb_dim, generator=gen) * 3 for _ in range(5)]
    requests = [_request([7, 8 + i], h) for i, h in enumerate(hidden)]
    requests.append(_request([5, 6], None))  # no state yet: no drafts
    drafts = proposer.propose(requests, [4, 2, 0, 9, 4, 4])
    expected = [_by_hand(weights, config, h, 8 + i) for i, h in enumerate(hidden)]
    assert drafts == [expected[0], expected[1][:2], [], expected[3], expected[4], []]
    assert len({tuple(d) for d in drafts if d}) > 1  # the states and tokens matter


def _bad(tmp_path: Path, model_dir: Path, edit_config=None, drop=None, reshape=None,
         num_tokens=None):  # fmt: skip
    target = ModelConfig.from_pretrained(model_dir)
    config = {"vocab_size": target.vocab_size, "emb_dim": target.hidden_size, "inner_dim": 0,
              "n_predict": 3, "tie_weights": False, "scale_input": False}  # fmt: skip
    config.update(edit_config or {})
    weights = _fms_weights(target.vocab_size, target.hidden_size, target.hidden_size, 3, False, 0)
    if drop:
        del weights[drop]
    if reshape:
        weights[reshape] = weights[reshape][:, :-1].contiguous()
    spec_dir = _write_checkpoint(tmp_path / "bad", config, weights)
    spec = {"method": "mlp_speculator", "model": str(spec_dir)}
    if num_tokens is not None:
        spec["num_speculative_tokens"] = num_tokens
    LLM(str(model_dir), num_kv_blocks=16, speculative_config=spec)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop": "head.1.weight"}, "weight 'head.1.weight' is missing"),
        ({"reshape": "proj.2.weight"}, r"'proj.2.weight' has shape \(64, 63\), expected"),
        ({"edit_config": {"vocab_size": 1000}}, "vocab_size is 1000, but the target model's"),
        ({"edit_config": {"emb_dim": 32}}, "emb_dim is 32, but the target model's hidden_size"),
        ({"edit_config": {"n_predict": None}}, "n_predict must be an integer"),
        ({"edit_config": {"tie_weights": "yes"}}, "tie_weights must be true or false"),
        ({"num_tokens": 4}, r"num_speculative_tokens \(4\) is above .* n_predict \(3"),
    ],
)
def test_bad_checkpoints_are_refused_naming_the_key(tiny_model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _bad(tmp_path, tiny_model("llama"), **kwargs)


def test_config_needs_the_speculator_directory(tmp_path):
    with pytest.raises(ValueError, match="speculative_config.model .* is required"):
        SpeculativeConfig.from_dict({"method": "mlp_speculator"})
    with pytest.raises(ValueError, match="speculative_config.model: .* has no config.json"):
        SpeculativeConfig.from_dict({"method": "mlp_speculator", "model": str(tmp_path)})


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """`trained(arch)`: a speculator trained by `baton train-speculator` for a few steps."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"spec-{arch}")
            assert baton(["train-speculator", "--model", str(tiny_model(arch)),
                          "--out", str(out), *QUICK]) == 0  # fmt: skip
            built[arch] = out
        return built[arch]

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_equals_no_speculation(tiny_model, trained, arch):
    """As tests.test_spec_decode's: small cache (preemption), chunked prompts, the prompts sent
    twice (prefix hits); every decode step drafts."""
    model = str(tiny_model(arch))
    prompts = _prompts(10)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    kw = {"num_kv_blocks": 48, "block_size": 4, "max_num_batched_tokens": 24}
    expected = _run(LLM(model, **kw), prompts, params)
    spec = {"method": "mlp_speculator", "model": str(trained(arch))}
    llm = LLM(model, speculative_config=spec, **kw)
    assert _run(llm, prompts, params) == expected
    assert _run(llm, prompts, params) == expected  # again: prefix hits
    core = llm.engine.core
    stats = core.scheduler.spec_stats
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= 2 * stats.num_drafts
    assert core.scheduler.num_preemptions > 0 and core.prefix_cache_stats.hits > 0
    llm.check_integrity()


def test_training_is_deterministic_and_saved_in_the_fms_layout(tiny_model, trained, tmp_path):
    model_dir = tiny_model("llama")
    again = tmp_path / "again"
    assert baton(["train-speculator", "--model", str(model_dir), "--out", str(again), *QUICK]) == 0
    first = trained("llama")
    assert (first / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    config = json.loads((first / "config.json").read_text())
    assert config["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert config["model_type"] == "mlp_speculator"
    assert {k: config[k] for k in ("emb_dim", "inner_dim", "n_predict", "tie_weights")} == {
        "emb_dim": 64, "inner_dim": 0, "n_predict": 3, "tie_weights": False}  # fmt: skip


def test_bad_training_options_are_refused(tiny_model, tmp_path, capsys):
    model = str(tiny_model("llama"))
    assert baton(["train-speculator", "--model", model, "--out", str(tmp_path),
                  "--n-predict", "1", "--tie-weights"]) == 2  # fmt: skip
    assert "--tie-weights needs --n-predict >= 2" in capsys.readouterr().err
    assert baton(["train-speculator", "--model", model, "--out", str(tmp_path),
                  "--data", str(tmp_path / "none.txt")]) == 2  # fmt: skip
    assert "--data: cannot read" in capsys.readouterr().err


def test_a_trained_speculator_gets_drafts_accepted(tiny_model, tmp_path):
    """Trained on its own answers to repetitive text, the speculator predicts the tiny model
    on new prompts of that text often enough to be worth it."""
    model_dir = tiny_model("qwen2")
    data = tmp_path / "repetitive.txt"
    data.write_text(" ".join(f"item {i % 7} costs {i % 5} coins;" for i in range(400)))
    options = TrainOptions(model=model_dir, out=tmp_path / "spec", data=[data], seq_len=24,
                           batch_size=8, stage1_steps=40, stage2_steps=60, stage2_prompts=16,
                           lr=3e-3, threads=1)  # fmt: skip
    summary = train_speculator(options, progress=False)
    assert summary["stage2_head_losses"][0] < 3.0
    tokenizer = load_tokenizer(model_dir)
    prompts = stage2_prompts(tokenizer, data.read_text(), 8, random.Random(1))  # unseen ones
    spec = {"method": "mlp_speculator", "model": str(options.out)}
    llm = LLM(str(model_dir), num_kv_blocks=128, speculative_config=spec)
    _run(llm, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_accepted_tokens > 0.2 * stats.num_draft_tokens


def test_training_text_from_a_directory(tmp_path):
    from engine.spec_decode.train_mlp import load_text

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "b.py").write_text("def b(): pass")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_text([tmp_path]) == "alpha\n\ndef b(): pass"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--data: .*empty holds no"):
        load_text([tmp_path / "empty"])
