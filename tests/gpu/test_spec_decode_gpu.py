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

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}  # fmt: skip


def test_greedy_with_drafts_in_graphs_equals_plain(tiny_model):
    from engine import LLM, SamplingParams

    model = str(tiny_model("llama"))
    motifs = [[17, 230, 41, 99], [5, 6, 7, 300, 301], [88, 12, 88, 13], [250, 251]]
    prompts = [(m * 8)[: 12 + 5 * i] for i, m in enumerate(motifs * 3)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    outputs = {}
    for spec in (None, NGRAM):
        llm = LLM(model, device="cuda", max_num_seqs=16, kv_cache_memory_bytes=1 << 28,
                  speculative_config=spec)  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs[spec is None] = [o.outputs[0].token_ids for o in outs]
        core = llm.engine.core
        assert core.runner.graphs.replays > 0
        if spec is not None:
            assert core.scheduler.spec_stats.num_accepted_tokens > 0
        llm.check_integrity()
    pairs = list(zip(outputs[True], outputs[False], strict=True))
    same = [a == b for a, b in pairs]
    first = [  # the first position where they differ (lengths are equal: ignore_eos)
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        for a, b in pairs
    ]
    print("identical:", sum(same), "of", len(same), "first difference at:", first)
    assert sum(same) >= len(same) // 2
    assert min(first) >= 8


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
