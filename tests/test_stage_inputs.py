"""The decode graphs' staged step as the host packs it (`engine.cuda_graphs.pack_step`); the
kernel that unpacks it on the GPU is checked against its reference in tests/gpu."""

import random

import numpy as np
import pytest

from engine.cuda_graphs import pack_step, staged_size

N, MAX_BLOCKS, BLOCK_SIZE = 8, 40, 16


@pytest.mark.parametrize("batch,num_rows", [(8, 8), (8, 5), (4, 1)])
@pytest.mark.parametrize("on_device", [False, True], ids=["host-ids", "previous-argmax-rows"])
def test_a_step_packs_into_the_documented_layout(batch, num_rows, on_device):
    rng = random.Random(batch * 10 + num_rows)
    positions = [rng.randrange(0, BLOCK_SIZE * 30) for _ in range(num_rows)]
    # each table covers its position and maybe a block or two more (never read)
    tables = [[rng.randrange(1, 500) for _ in range(p // BLOCK_SIZE + 1 + rng.randrange(3))]
              for p in positions]  # fmt: skip
    tokens = [rng.randrange(0, 1000) for _ in range(num_rows)]
    rows = rng.sample(range(N), num_rows)
    staged = np.full(staged_size(N, MAX_BLOCKS), 99, dtype=np.int32)
    given = {"from_rows": rows} if on_device else {"tokens": tokens}
    used = pack_step(staged, batch, positions, tables, **given)
    width = max(map(len, tables))
    assert used == 1 + 2 * batch + batch * width
    assert staged[0] == width
    pad = batch - num_rows
    ids = [-1 - r for r in rows] if on_device else tokens
    assert staged[1 : 1 + batch].tolist() == ids + [0] * pad
    assert staged[1 + batch : 1 + 2 * batch].tolist() == positions + [-1] * pad
    packed = staged[1 + 2 * batch : used].reshape(batch, width)
    for i, table in enumerate(tables):
        assert packed[i, : len(table)].tolist() == table
    assert (packed[num_rows:] == 0).all()  # padding rows read block 0
    assert (staged[used:] == 99).all()


def test_pack_step_takes_ids_or_rows_not_both():
    staged = np.zeros(staged_size(N, MAX_BLOCKS), dtype=np.int32)
    with pytest.raises(ValueError, match="exactly one of tokens and from_rows"):
        pack_step(staged, 1, [0], [[1]], tokens=[5], from_rows=[0])
    with pytest.raises(ValueError, match="exactly one of tokens and from_rows"):
        pack_step(staged, 1, [0], [[1]])
