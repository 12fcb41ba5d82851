"""The decode graphs' host-side pieces: captured batch sizes (the capture itself, and the
argmax kernel of its replays, run in tests/gpu)."""

from engine.cuda_graphs import default_capture_sizes


def test_capture_sizes_follow_vllms_ladder_up_to_max_num_seqs():
    assert default_capture_sizes(1) == [1]
    assert default_capture_sizes(6) == [1, 2, 4, 6]
    assert default_capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_capture_sizes(130)[-3:] == [120, 128, 130]
