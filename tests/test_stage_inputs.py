"""The decode graphs' staged step as the host packs it (`engine.cuda_graphs.pack_step`); the
kernel that unpacks it on the GPU is checked against its reference in tests/gpu."""

import random

import numpy as np
import pytest

from engine.cuda_graphs import from_row, pack_step, staged_size

N, MAX_BLOCKS, BLOCK_SIZE = 8, 40, 16


@pytest.mark.parametrize("batch,num_rows", [(8, 8), (8, 5), (4, 1)])
@pytest.mark.parametrize(
    "on_device", [False, True, None], ids=["host-ids", "previous-argmax-rows", "mixed"]
)
def test_a_step_packs_into_the_documented_layout(batch, num_rows, on_device):
    rng = random.Random(batch * 10 + num_rows)
    positions = [rng.randrange(0, BLOCK_SIZE * 30) for _ in range(num_rows)]
    # each table covers its position and maybe a block or two more (never read)
    tables = [[rng.randrange(1, 500) for _ in range(p // BLOCK_SIZE + 1 + rng.randrange(3))]
              for p in positions]  # fmt: skip
    tokens = [rng.randrange(0, 1000) for _ in range(num_rows)]
    rows = rng.sample(range(N), num_rows)
    staged = np.full(staged_size(N, MAX_BLOCKS), 99, dtype=np.int32)
    # on_device None: rows alternate between host ids and rows of the previous argmax
    ids = [
        from_row(r) if on_device or (on_device is None and i % 2) else t
        for i, (t, r) in enumerate(zip(tokens, rows, strict=True))
    ]
    used = pack_step(staged, batch, positions, tables, ids)
    width = max(map(len, tables))
    assert used == 1 + 2 * batch + batch * width
    assert staged[0] == width
    pad = batch - num_rows
    if on_device:
        assert ids == [-1 - r for r in rows]
    assert staged[1 : 1 + batch].tolist() == ids + [0] * pad
    assert staged[1 + batch : 1 + 2 * batch].tolist() == positions + [-1] * pad
    packed = staged[1 + 2 * batch : used].reshape(batch, width)
    for i, table in enumerate(tables):
        assert packed[i, : len(table)].tolist() == table
    assert (packed[num_rows:] == 0).all()  # padding rows read block 0
    assert (staged[used:] == 99).all()


def test_pack_step_needs_one_id_and_one_table_per_row():
    staged = np.zeros(staged_size(N, MAX_BLOCKS), dtype=np.int32)
    with pytest.raises(ValueError, match="one entry per row"):
        pack_step(staged, 2, [0, 1], [[1], [2]], [5])
    with pytest.raises(ValueError, match="one entry per row"):
        pack_step(staged, 2, [0, 1], [[1]], [5, 6])


def test_packing_over_what_the_buffer_holds_rewrites_what_changed():
    """Steps packed into one buffer that remembers its rows (`PackedTables`) read as a fresh
    packing would: tables grow (the manager's lists only grow), requests finish and arrive,
    rows reorder, the widest table and the graph size change."""
    from engine.cuda_graphs import PackedTables

    rng = random.Random(7)
    staged = np.full(staged_size(N, MAX_BLOCKS), 99, dtype=np.int32)
    held = PackedTables()
    live = [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 6))] for _ in range(6)]
    for step in range(300):
        for table in live:  # a block now and then; the list object stays the same
            if rng.random() < 0.2 and len(table) < MAX_BLOCKS:
                table.append(rng.randrange(1, 500))
        if rng.random() < 0.1 and len(live) > 1:
            live.pop(rng.randrange(len(live)))  # finished
        if rng.random() < 0.1 and len(live) < N:
            live.insert(rng.randrange(len(live) + 1), [rng.randrange(1, 500)])  # arrived
        if rng.random() < 0.05:
            rng.shuffle(live)
        batch = N if len(live) > 4 or step % 2 else 4
        positions = [len(t) * BLOCK_SIZE - 1 for t in live]
        ids = [rng.randrange(1000) for _ in live]
        used = pack_step(staged, batch, positions, live, ids, held)
        width = max(map(len, live))
        assert used == 1 + 2 * batch + batch * width and staged[0] == width
        assert staged[1 : 1 + batch].tolist() == ids + [0] * (batch - len(live))
        assert staged[1 + batch : 1 + 2 * batch].tolist() == positions + [-1] * (
            batch - len(live)
        )
        packed = staged[1 + 2 * batch : used].reshape(batch, width)
        for i, table in enumerate(live):
            assert packed[i, : len(table)].tolist() == table
        assert (packed[len(live) :] == 0).all()
    # the same step again leaves the held rows alone: a mark in one survives
    packed[0, 0] = -7
    pack_step(staged, batch, positions, live, ids, held)
    assert packed[0, 0] == -7


def test_fill_rows_puts_each_list_at_the_start_of_its_row():
    from engine.cuda_graphs import fill_rows

    out = np.full((3, 4), -1, dtype=np.int32)
    fill_rows(out, [[5, 6], [], [7, 8, 9, 10]], [2, 0, 4])
    assert out.tolist() == [[5, 6, -1, -1], [-1, -1, -1, -1], [7, 8, 9, 10]]


def test_a_table_trimmed_after_rejected_drafts_packs_its_new_block():
    """Rejected drafts give their block back (`KVCacheManager.trim`), and the next verify step
    takes another in its place: the graphs' packed table must hold the new block, not the one
    given back (it did, and the graphs then read and wrote another sequence's block)."""
    from engine.cuda_graphs import PackedTables
    from engine.kv_cache.manager import KVCacheManager
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = Request("a", list(range(6)), SamplingParams(max_tokens=20), max_tokens=20)
    assert kv.allocate_slots(req, 6)
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 3)  # verify 1 + 2 drafts: positions 6..8 reach block 3
    staged = np.zeros(staged_size(2, 4), dtype=np.int32)
    held = PackedTables()
    pack_step(staged, 2, [6, 7], [kv.block_ids("a")] * 2, [1, 2], held)
    given_back = kv.block_ids("a")[-1]
    req.num_computed_tokens = 7  # one draft rejected: block 3 goes back
    kv.trim(req)
    assert kv.allocate_slots(req, 2)  # the next verify step needs a third block: another one
    table = kv.block_ids("a")
    assert len(table) == 3 and table[-1] != given_back
    used = pack_step(staged, 2, [7, 8], [table] * 2, [1, 2], held)
    assert staged[1 + 2 * 2 : used].reshape(2, 3).tolist() == [table, table]
