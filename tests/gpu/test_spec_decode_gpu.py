"""Speculative decoding on a GPU: verify steps replayed from CUDA graphs (k + 1 rows per
sequence) give the tokens of plain decoding, up to rounding: the GPU kernels' reduction order
depends on the batch's shape (the decode attention's split count is chosen per captured size),
so a verify step's rows and a plain step's row may round differently, and a random model's
near-tied logits then pick another token (as batching alone can). On the CPU the outputs are
identical (tests/test_spec_decode.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEAR_TIE = 0.1  # nats between plain decoding's top two (float32): what rounding can flip

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip


def test_greedy_with_drafts_in_graphs_equals_plain(tiny_model):
    """Where a run with drafts leaves plain decoding's tokens, it is at a near tie: it took
    plain decoding's runner-up, within NEAR_TIE of its first choice (a wrong block read after
    rejected drafts once gave divergences where plain decoding was sure, margins of 6)."""
    from engine import LLM, SamplingParams

    model = str(tiny_model("llama"))
    motifs = [[17, 230, 41, 99], [5, 6, 7, 300, 301], [88, 12, 88, 13], [250, 251]]
    prompts = [(m * 8)[: 12 + 5 * i] for i, m in enumerate(motifs * 3)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    outputs = {}
    for spec in (None, NGRAM):
        llm = LLM(model, device="cuda", dtype="float32", max_num_seqs=16,
                  kv_cache_memory_bytes=1 << 28, speculative_config=spec)  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs[spec is None] = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
        core = llm.engine.core
        assert core.runner.graphs.replays > 0
        if spec is not None:
            assert core.scheduler.spec_stats.num_accepted_tokens > 0
        llm.check_integrity()
    same = 0
    for (plain, plain_lps), (drafted, _) in zip(outputs[True], outputs[False], strict=True):
        at = next((i for i, (x, y) in enumerate(zip(plain, drafted, strict=True)) if x != y), None)
        if at is None:
            same += 1
            continue
        ranked = sorted(plain_lps[at].items(), key=lambda kv: -kv[1].logprob)
        (_, first), (runner_up, second) = ranked[:2]
        assert drafted[at] == runner_up, f"position {at}: not plain decoding's runner-up"
        assert first.logprob - second.logprob <= NEAR_TIE, f"position {at}: no near tie"
    print("identical:", same, "of", len(prompts))
    assert same >= len(prompts) // 2


def test_graphed_mlp_drafts_equal_eager_ones():
    from engine.spec_decode.mlp_speculator import GraphedDraft, MLPSpeculator, MlpSpeculatorConfig

    torch.manual_seed(0)
    config = MlpSpeculatorConfig(vocab_size=512, emb_dim=64, inner_dim=96, n_predict=3)
    model = MLPSpeculator(config).cuda().eval()
    graphed = GraphedDraft(model, 3, [1, 2, 4, 8])
    for rows, padded in ((1, 1), (4, 4), (8, 8), (3, 4), (5, 8), (2, 2)):
        hidden = torch.randn(padded, 64, device="cuda")
        last = torch.randint(0, 512, (padded,), device="cuda")
        eager = model.draft(hidden, last, 3)[:rows]  # the padded shape the graph runs
        assert torch.equal(graphed(hidden[:rows], last[:rows]), eager)
    assert sorted(graphed._graphs) == [1, 2, 4, 8]
    assert graphed(torch.randn(9, 64, device="cuda"), torch.zeros(9, dtype=torch.long)) is None


def test_mlp_speculator_drafts_through_graphs_in_the_engine(tiny_model, tmp_path):
    import json

    from engine import LLM, SamplingParams
    from engine.spec_decode.mlp_speculator import MLPSpeculator, MlpSpeculatorConfig
    from engine.spec_decode.train_mlp import save_speculator

    model = tiny_model("llama")
    target = json.loads((model / "config.json").read_text())
    torch.manual_seed(0)
    config = MlpSpeculatorConfig(target["vocab_size"], target["hidden_size"], 0, n_predict=3)
    save_speculator(MLPSpeculator(config), tmp_path / "spec")
    spec = {"method": "mlp_speculator", "model": str(tmp_path / "spec")}
    llm = LLM(str(model), device="cuda", max_num_seqs=8, kv_cache_memory_bytes=1 << 28,
              speculative_config=spec)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([[5, 6, 7, 8 + i] for i in range(6)], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 32 for o in outs)
    core = llm.engine.core
    assert core.proposer.graphed is not None and core.proposer.graphed._graphs
    assert core.scheduler.spec_stats.num_draft_tokens > 0
    llm.check_integrity()


def test_eagle_verify_steps_run_in_graphs(tiny_model, tmp_path):
    """EAGLE's target states come out of the decode graphs (a static buffer captured with
    them): on a bigram target the exact EAGLE-1 head's drafts are accepted (a stale or
    misplaced state would show as rejections) and greedy outputs are plain decoding's; a
    random EAGLE-3 head (three layers' states) keeps them too, up to near ties."""
    from engine import LLM, SamplingParams
    from tests.test_spec_decode import _prompts
    from tests.test_spec_eagle import _spec, bigram_target, exact_eagle_head, write_head

    target = bigram_target(tiny_model("llama"), tmp_path / "target")
    prompts = _prompts(8, seed=2)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    options = {"device": "cuda", "dtype": "float32", "max_num_seqs": 8,
               "kv_cache_memory_bytes": 1 << 28}  # fmt: skip

    def run(spec):
        llm = LLM(str(target), speculative_config=spec, **options)
        outs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        core = llm.engine.core
        assert core.runner.graphs is not None and core.runner.graphs.replays > 0
        llm.check_integrity()
        return outs, core.scheduler.spec_stats

    plain, _ = run(None)
    exact = exact_eagle_head(tmp_path / "eagle", target)
    drafted, stats = run(_spec(exact, False))
    assert stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens
    assert sum(a == b for a, b in zip(drafted, plain, strict=True)) >= len(plain) - 1
    head3 = write_head(tmp_path / "eagle3", target, True, aux=[1, 0, 1])
    drafted3, stats3 = run(_spec(head3, True))
    assert stats3.num_draft_tokens > 0
    assert sum(a == b for a, b in zip(drafted3, plain, strict=True)) >= len(plain) - 1
