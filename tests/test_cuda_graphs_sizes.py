"""The decode graphs' host-side pieces: captured batch sizes (the capture itself, and the
argmax kernel of its replays, run in tests/gpu)."""

from engine.cuda_graphs import default_capture_sizes


def test_capture_sizes_follow_vllms_ladder_up_to_max_num_seqs():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(6) == [1, 2, 4, 6]
    assert default_capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_capture_sizes(130)[-3:] == [120, 128, 130]


def test_step_views_share_one_block_without_overlap():
    """The per-row inputs travel in one copy: their views tile the byte block exactly."""
    import torch

    from engine.cuda_graphs import _step_views

    n = 5
    block = torch.zeros(28 * n, dtype=torch.uint8)
    views = _step_views(block, n)
    for i, name in enumerate(("tokens", "positions", "slots", "seq_lens")):
        views[name][:] = torch.arange(n) + 10 * (i + 1)
    assert views["tokens"].dtype == torch.int64 and views["seq_lens"].dtype == torch.int32
    assert views["tokens"].tolist() == [10, 11, 12, 13, 14]
    assert views["slots"].tolist() == [30, 31, 32, 33, 34]
    assert views["seq_lens"].tolist() == [40, 41, 42, 43, 44]
    assert block[24 * n :].view(torch.int32).tolist() == views["seq_lens"].tolist()
    assert block[8 * n : 16 * n].view(torch.int64).tolist() == [20, 21, 22, 23, 24]
