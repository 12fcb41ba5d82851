"""experiments.gpu_decode_attention's block layouts (the timing itself runs on a GPU)."""

import pytest
import torch

from experiments.gpu_decode_attention import BLOCK_SIZE, MAX_CONTEXT, block_tables


@pytest.mark.parametrize("layout", ["contiguous", "shuffled"])
def test_every_block_of_the_pool_is_used_once(layout):
    tables, num_blocks = block_tables(3, 50, layout, torch.Generator().manual_seed(0))
    per_seq = -(-50 // BLOCK_SIZE)
    assert tables.shape == (3, MAX_CONTEXT // BLOCK_SIZE) and num_blocks == 3 * per_seq
    used = tables[:, :per_seq].flatten()
    assert sorted(used.tolist()) == list(range(num_blocks))
    assert not tables[:, per_seq:].any()  # past the context: padding, never read


def test_contiguous_blocks_follow_each_other_and_shuffled_ones_do_not():
    gen = torch.Generator().manual_seed(1)
    contiguous, _ = block_tables(4, 1024, "contiguous", gen)
    shuffled, _ = block_tables(4, 1024, "shuffled", gen)
    per_seq = 1024 // BLOCK_SIZE
    assert (contiguous[:, 1:per_seq] - contiguous[:, : per_seq - 1] == 1).all()
    assert (shuffled[:, 1:per_seq] - shuffled[:, : per_seq - 1] != 1).any()
    with pytest.raises(ValueError, match="layout"):
        block_tables(1, 16, "striped", gen)
