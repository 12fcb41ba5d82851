"""The decode graphs' host-side pieces: captured batch sizes and the two-stage argmax (the
capture itself runs in tests/gpu)."""

import pytest
import torch

from engine.cuda_graphs import argmax_rows, default_capture_sizes


def test_capture_sizes_follow_vllms_ladder_up_to_max_num_seqs():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(6) == [1, 2, 4, 6]
    assert default_capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_capture_sizes(130)[-3:] == [120, 128, 130]


@pytest.mark.parametrize("vocab", [128256, 4096, 1000, 512])  # the last two: one stage
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_argmax_with_its_ties(vocab, dtype):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=gen).to(dtype)
    top = logits.max() + 1
    logits[1, [5, vocab - 1]] = top  # tie across ranges: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = top  # tie inside a range
    logits[3] = 0.0  # all equal: index 0
    logits[4, -1] = top  # the last index
    assert torch.equal(argmax_rows(logits), logits.argmax(dim=-1))
