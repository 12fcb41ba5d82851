"""EAGLE speculative decoding (engine.spec_decode.eagle) with tiny heads in the public layouts.

Heads are written here in yuhuili's EAGLE-1 and EAGLE-3 layouts. Random heads on the tiny
targets draft badly; their greedy outputs must still equal those without drafts. On a "bigram"
target (attention outputs zeroed: each token's successor depends on it alone) heads are built
that predict well: an EAGLE-1 head whose fc passes the token's embedding through the target's
own first layer drafts exactly what the target will say (every draft accepted: the head's
cache and the target's states are bookkept exactly), and an EAGLE-3 head whose fc reads the
target's stream entering layer 1 and whose `d2t` maps each token to its successor drafts the
first token exactly. Runs use small caches (preemption), low token budgets (chunked prompts)
and each prompt twice (prefix hits). Drafts are also compared with those of a fresh head fed
the states transformers computes (the states' conventions: the final post-norm state for
EAGLE-1, `hidden_states[i]` entering layer i for EAGLE-3)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.sampling_params import SamplingParams
from engine import LLM
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from engine.core import EngineCore
from engine.kv_connector import KVConnectorConfig, make_kv_connector
from engine.kv_connector.receive import ReceiveConnector
from engine.request import KVHandoff, Request
from engine.sampling_params import SamplingParams as EngineSamplingParams
from engine.spec_decode.eagle import MAX_PENDING_STATES, EagleProposer, bound_states, merge_states
from kv_transfer import TcpKVReceiver, TcpKVSender, TransferSpec
from tests.test_spec_decode import _prompts, _run

SMALL_CACHE = {"num_kv_blocks": 36, "block_size": 4, "max_num_batched_tokens": 24}
ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def _target_weights(model: Path) -> dict[str, torch.Tensor]:
    weights = load_file(model / "model.safetensors")
    if "lm_head.weight" not in weights:  # tied
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


def write_head(
    dest: Path, model: Path, eagle3: bool, weights: dict[str, torch.Tensor] | None = None,
    seed: int = 0, aux: list[int] | None = (0, 1, 1), **config: object,
) -> Path:  # fmt: skip
    """An EAGLE(-3) head for `model` in directory `dest`: random weights (scaled like the
    tiny models'), overridden by `weights` (Hugging Face names, without the layer prefix)."""
    target = json.loads((model / "config.json").read_text())
    hidden, inter = target["hidden_size"], target["intermediate_size"]
    heads, kv_heads, head_dim = 4, 2, 16
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    wide = hidden * (2 if eagle3 else 1)  # EAGLE-3's attention reads cat(embeds, hidden)
    layer = {
        "self_attn.q_proj.weight": normal(heads * head_dim, wide, std=0.2),
        "self_attn.k_proj.weight": normal(kv_heads * head_dim, wide, std=0.2),
        "self_attn.v_proj.weight": normal(kv_heads * head_dim, wide, std=0.2),
        "self_attn.o_proj.weight": normal(hidden, heads * head_dim, std=0.2),
        "post_attention_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
        "mlp.gate_proj.weight": normal(inter, hidden, std=0.2),
        "mlp.up_proj.weight": normal(inter, hidden, std=0.2),
        "mlp.down_proj.weight": normal(hidden, inter, std=0.2),
    }  # fmt: skip
    head = {"fc.weight": normal(hidden, hidden * (3 if eagle3 else 2), std=0.2)}
    if eagle3:
        vocab = target["vocab_size"]
        layer |= {"input_layernorm.weight": normal(hidden, std=0.1, mean=1.0),
                  "hidden_norm.weight": normal(hidden, std=0.1, mean=1.0)}  # fmt: skip
        head |= {"norm.weight": normal(hidden, std=0.1, mean=1.0),
                 "lm_head.weight": normal(vocab, hidden, std=1.0),
                 "d2t": torch.zeros(vocab, dtype=torch.long),
                 "t2d": torch.ones(vocab, dtype=torch.bool)}  # fmt: skip
    for name, value in (weights or {}).items():
        (head if name in head else layer)[name] = value
    prefix = "midlayer." if eagle3 else "layers.0."
    tensors = head | {prefix + k: v.contiguous() for k, v in layer.items()}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest / "model.safetensors"), {"format": "pt"})
    hf = {
        "architectures": ["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"],
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "rms_norm_eps": 1e-6, "vocab_size": target["vocab_size"],
        "max_position_embeddings": 4096, "torch_dtype": "float32",
    }  # fmt: skip
    if eagle3:
        hf |= {"draft_vocab_size": target["vocab_size"]}
        if aux is not None:
            hf["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux)}
    hf |= config
    (dest / "config.json").write_text(json.dumps(hf))
    return dest


def bigram_target(model: Path, dest: Path) -> Path:
    """`model` with every attention output and the later layers' MLPs zeroed and a final norm
    of ones: each token's successor is a function of that token (layer 0's MLP)."""
    shutil.copytree(model, dest)
    weights = load_file(model / "model.safetensors")
    for name, w in weights.items():
        later = name.startswith("model.layers.") and not name.startswith("model.layers.0.")
        if name.endswith("o_proj.weight") or (later and "down_proj" in name):
            weights[name] = torch.zeros_like(w)
    weights["model.norm.weight"] = torch.ones_like(weights["model.norm.weight"])
    save_file(weights, str(dest / "model.safetensors"), {"format": "pt"})
    return dest


def exact_eagle_head(dest: Path, target: Path) -> Path:
    """EAGLE-1 on a bigram target: fc passes embed(t) on, the layer is the target's layer 0
    without attention, the target's lm_head reads it: it drafts the target's own tokens."""
    w = _target_weights(target)
    hidden = w["model.embed_tokens.weight"].shape[1]
    fc = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
    layer = {k.removeprefix("model.layers.0."): v for k, v in w.items()
             if k.startswith("model.layers.0.") and ("mlp" in k or "post_attention" in k)}
    layer["self_attn.o_proj.weight"] = torch.zeros(hidden, 64)  # fmt: skip
    return write_head(dest, target, eagle3=False, weights={"fc.weight": fc, **layer})


def successor(target: Path) -> torch.Tensor:
    """(vocab,) the bigram target's greedy successor of each token (its math, in torch)."""
    w = _target_weights(target)
    x = w["model.embed_tokens.weight"]  # (V, H)

    def norm(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    p = "model.layers.0."
    h = norm(x, w[p + "post_attention_layernorm.weight"])
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    s = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return (norm(s, w["model.norm.weight"]) @ w["lm_head.weight"].T).argmax(dim=-1)


def first_exact_eagle3_head(dest: Path, target: Path) -> Path:
    """EAGLE-3 on a bigram target: fc reads the stream entering layer 1 (all the target has
    computed), the target's lm_head gives back the token it sampled, and `d2t` maps it to its
    successor: the first draft is exact (the chain repeats it)."""
    w = _target_weights(target)
    hidden = w["model.embed_tokens.weight"].shape[1]
    vocab, inter = w["lm_head.weight"].shape[0], w["model.layers.0.mlp.up_proj.weight"].shape[0]
    zeros = torch.zeros(hidden, hidden)
    return write_head(dest, target, eagle3=True, aux=[1, 0, 0], weights={
        "fc.weight": torch.cat([torch.eye(hidden), zeros, zeros], dim=1),
        "self_attn.o_proj.weight": torch.zeros(hidden, 64),
        "mlp.down_proj.weight": torch.zeros(hidden, inter),
        "norm.weight": torch.ones(hidden), "lm_head.weight": w["lm_head.weight"],
        "d2t": successor(target) - torch.arange(vocab),
    })  # fmt: skip


def _spec(head: Path, eagle3: bool, k: int = 3) -> dict:
    return {"method": "eagle3" if eagle3 else "eagle", "model": str(head),
            "num_speculative_tokens": k}  # fmt: skip


def _check_freed(llm: LLM) -> None:
    proposer = llm.engine.core.proposer
    assert isinstance(proposer, EagleProposer)
    assert proposer.entries == {} and proposer.cache.blocks == {}
    assert proposer.cache.num_free == proposer.cache.num_blocks
    llm.check_integrity()


def _twice(llm: LLM, prompts, params, expected) -> None:
    assert _run(llm, prompts, params) == expected
    assert _run(llm, prompts, params) == expected  # prefix hits
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0 and core.prefix_cache_stats.hits > 0
    _check_freed(llm)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_heads_keep_greedy_outputs(tiny_model, tmp_path, arch):
    """Random EAGLE-1 and EAGLE-3 heads on the tiny targets (real attention): the tokens of a
    run without drafts, with preemption, chunked prompts and prefix hits."""
    model = tiny_model(arch)
    prompts = _prompts(6)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _run(LLM(str(model), **SMALL_CACHE), prompts, params)
    for eagle3 in (False, True):
        head = write_head(tmp_path / f"head{int(eagle3)}", model, eagle3, aux=[1, 0, 1])
        llm = LLM(str(model), speculative_config=_spec(head, eagle3), **SMALL_CACHE)
        _twice(llm, prompts, params, expected)
        assert llm.engine.core.scheduler.spec_stats.num_draft_tokens > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_that_predict_well(tiny_model, tmp_path, arch):
    """On a bigram target, the exact EAGLE-1 head's drafts are all accepted (a stale, missing
    or misplaced entry or state would show as a rejection), and the EAGLE-3 head's first
    drafts are: accepted runs of several lengths. Greedy outputs unchanged."""
    target = bigram_target(tiny_model(arch), tmp_path / "target")
    prompts = _prompts(8, seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = _run(LLM(str(target), **SMALL_CACHE), prompts, params)
    exact = exact_eagle_head(tmp_path / "eagle", target)
    llm = LLM(str(target), speculative_config=_spec(exact, False), **SMALL_CACHE)
    _twice(llm, prompts, params, expected)
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0
    head3 = first_exact_eagle3_head(tmp_path / "eagle3", target)
    llm = LLM(str(target), speculative_config=_spec(head3, True), **SMALL_CACHE)
    _twice(llm, prompts, params, expected)
    stats = llm.engine.core.scheduler.spec_stats
    assert stats.num_drafts <= stats.num_accepted_tokens < stats.num_draft_tokens


def test_merge_states():
    a, b, c = torch.zeros(3, 2), torch.ones(2, 2), torch.full((5, 2), 2.0)
    assert merge_states([]) is None
    start, rows = merge_states([(0, a), (3, b)])
    assert start == 0 and rows.shape[0] == 5
    start, rows = merge_states([(0, a), (2, b)])  # overlap: the later rows of b
    assert start == 0 and rows[:, 0].tolist() == [0, 0, 0, 1]
    start, rows = merge_states([(0, a), (4, b)])  # a gap: starts over
    assert start == 4 and rows.equal(b)
    start, rows = merge_states([(3, b), (0, c)])  # a recompute covering it
    assert start == 0 and rows.equal(c)


def test_pending_states_are_bounded():
    """A request that does not draft for a while keeps only the last MAX_PENDING_STATES rows."""
    n = MAX_PENDING_STATES
    rows = torch.arange(n + 10, dtype=torch.float32).unsqueeze(1)
    entries = [(5, rows[:n]), (5 + n, rows[n:])]
    bound_states(entries)
    ((start, kept),) = entries
    assert start == 15 and kept.shape[0] == n and kept[0, 0].item() == 10.0
    small = [(0, rows[:3])]
    bound_states(small)
    assert len(small) == 1 and small[0][0] == 0 and small[0][1].equal(rows[:3])


def _core(model: Path, head: Path, connector: str | None = None, **options) -> EngineCore:
    config = EngineConfig(
        ModelConfig.from_pretrained(model), CacheConfig(num_blocks=64),
        SchedulerConfig(max_num_batched_tokens=16),
        speculative=SpeculativeConfig(method="eagle", model=str(head), num_speculative_tokens=3),
    )  # fmt: skip
    kv = None if connector is None else make_kv_connector(KVConnectorConfig(connector, options),
                                                          config)  # fmt: skip
    return EngineCore(config, kv)


def test_the_first_decode_step_after_a_hand_off_drafts(tiny_model, tmp_path):
    """The prefill engine sends the prompt's states (two chunks of it) with the KV over TCP;
    the decode engine's first step verifies drafts from them, all accepted (exact head)."""
    target = bigram_target(tiny_model("qwen2"), tmp_path / "target")
    head = exact_eagle_head(tmp_path / "head", target)
    prompt = _prompts(6, seed=4)[5]
    params = EngineSamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    saves = {}
    prefill = _core(target, head, "push", on_save=lambda s: saves.__setitem__(s.request_id, s))
    decode = _core(target, head, "receive")
    receive = decode.kv_connector
    assert isinstance(receive, ReceiveConnector)

    async def transfer() -> int:
        receiver, sender = TcpKVReceiver(receive.kv_caches), TcpKVSender()
        await receiver.start()
        try:
            reservation = receive.reserve(decode, Request("r", prompt, params, 12))
            arrived = receiver.expect("r", reservation.block_ids, time.time() + 10)
            handoff = KVHandoff(reservation.num_cached_tokens)
            prefill.add_request(Request("r", prompt, params, 12, kv_transfer=handoff))
            first = [t for out in _steps(prefill) for t in out.new_token_ids]
            save = saves.pop("r")
            assert save.extras["eagle_states"].shape[0] == len(prompt)
            spec = TransferSpec("r", receiver.endpoint, reservation.block_ids, time.time() + 10)
            await sender.send(spec, save.layers, save.extras)
            receive.kv_arrived("r", first, await arrived)
            return first[0]
        finally:
            await sender.close()
            await receiver.close()

    first = asyncio.run(asyncio.wait_for(transfer(), 30))
    (out,) = decode.step()
    assert len(out.new_token_ids) == 4  # three drafts accepted and its own token
    tokens = [first, *out.new_token_ids] + [t for o in _steps(decode) for t in o.new_token_ids]
    llm = LLM(str(target))
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert tokens == _run(llm, [prompt], plain)[0]
    for core in (prefill, decode):
        core.check_integrity(expect_all_free=True)


def _steps(core: EngineCore):
    while core.has_work():
        yield from core.step()


@pytest.mark.parametrize(("eagle3", "change", "message"), [
    (False, {"hidden_size": 32}, "hidden_size is 32"),
    (False, {"num_hidden_layers": 2}, "heads of one layer only"),
    (True, {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 5]}},
     "eagle_aux_hidden_state_layer_ids must be 3 layer ids in [0, 2)"),
    (True, {"eagle_config": {}}, "the default for a target of 2 layers"),
])  # fmt: skip
def test_bad_heads_are_refused_naming_the_field(tiny_model, tmp_path, eagle3, change, message):
    model = tiny_model("llama")
    head = write_head(tmp_path / "head", model, eagle3, **change)
    with pytest.raises(ValueError, match="speculative_config.model") as e:
        LLM(str(model), speculative_config=_spec(head, eagle3))
    assert message in str(e.value)


def test_bad_weights_are_refused(tiny_model, tmp_path):
    model = tiny_model("llama")
    head = write_head(tmp_path / "head", model, False)
    weights = load_file(head / "model.safetensors")
    weights["layers.0.mlp.up_proj.weight"] = weights["layers.0.mlp.up_proj.weight"][:5]
    save_file(weights, str(head / "model.safetensors"))
    with pytest.raises(ValueError, match="speculative_config.model.*up_proj.*shape"):
        LLM(str(model), speculative_config=_spec(head, False))
    del weights["layers.0.mlp.up_proj.weight"]
    save_file(weights, str(head / "model.safetensors"))
    with pytest.raises(ValueError, match="speculative_config.model.*up_proj.weight' is missing"):
        LLM(str(model), speculative_config=_spec(head, False))
    (head / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="speculative_config.model.*has no weights"):
        LLM(str(model), speculative_config=_spec(head, False))


def record_drafts(llm: LLM) -> tuple[list[tuple[list[int], list[int]]], EagleProposer, Any]:
    """A list that gathers, from now on, each request's tokens and the drafts the engine's
    EAGLE drafter proposed after them (requests without drafts left out); the drafter, and its
    own `propose`, unrecorded."""
    proposer = llm.engine.core.proposer
    assert isinstance(proposer, EagleProposer)
    seen: list[tuple[list[int], list[int]]] = []
    propose = proposer.propose

    def recording(requests, max_drafts):
        drafts = propose(requests, max_drafts)
        seen.extend((list(r.all_token_ids), d) for r, d in zip(requests, drafts, strict=True) if d)
        return drafts

    proposer.propose = recording  # type: ignore[method-assign]
    return seen, proposer, propose


@pytest.mark.parametrize("eagle3", [False, True], ids=["eagle", "eagle3"])
def test_drafts_are_those_of_transformers_states(tiny_model, tmp_path, eagle3):
    """Each step's drafts (prompts in chunks, several requests in a batch) equal those of the
    same head fed at once the states transformers computes for the request's tokens: the final
    post-norm state (EAGLE-1), `hidden_states[i]` entering layer i (EAGLE-3, ids 1, 0, 1)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    head = write_head(tmp_path / "head", model, eagle3, aux=[1, 0, 1])
    llm = LLM(str(model), speculative_config=_spec(head, eagle3), max_num_batched_tokens=8)
    seen, proposer, propose = record_drafts(llm)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    _run(llm, _prompts(3, seed=5), params)
    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    assert len(seen) > 5
    for i, (tokens, drafts) in enumerate(seen[::3]):
        with torch.no_grad():
            hs = hf(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        states = torch.cat([hs[1], hs[0], hs[1]], dim=-1) if eagle3 else hs[-1]
        request = Request(f"ref{i}", tokens, EngineSamplingParams(), 1)
        request.spec_states = [(0, states[0])]
        assert propose([request], [len(drafts)]) == [drafts]
        proposer.finished(request)
