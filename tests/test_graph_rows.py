"""Which steps run in the decode graphs and as which rows (`engine.cuda_graphs.graph_rows`):
decodes one row each, short prompt chunks one row per token; the graphs themselves run in
tests/gpu (their outputs equal the eager engine's)."""

from engine.cuda_graphs import GRAPH_PROMPT_READS, from_row, graph_rows
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest

SIZES = [1, 2, 4, 8, 16]


def item(
    prompt_len: int, computed: int, num_tokens: int, outputs: int = 0, **params
) -> ScheduledRequest:
    request = Request(
        request_id=f"r{prompt_len}-{computed}-{num_tokens}",
        prompt_token_ids=[100 + i for i in range(prompt_len)],
        params=SamplingParams(**params),
        max_tokens=64,
        output_token_ids=[900 + i for i in range(outputs)],
    )
    request.num_computed_tokens = computed
    blocks = list(range(10, 10 + -(-(computed + num_tokens) // 16)))
    return ScheduledRequest(request, num_tokens, blocks)


def test_a_decode_step_is_one_row_per_request():
    a, b = item(20, 22, 1, outputs=3), item(5, 5, 1, outputs=1)
    rows = graph_rows([a, b], SIZES)
    assert rows is not None
    assert rows.ids == [902, 900] and rows.positions == [22, 5]
    assert rows.tables == [a.block_ids, b.block_ids] and rows.sample_rows == [0, 1]


def test_prompt_chunks_are_one_row_per_token_beside_decodes():
    decode = item(9, 10, 1, outputs=2)
    whole = item(4, 0, 4)  # a whole prompt: its last row samples
    part = item(30, 16, 6)  # chunk 16..21 after a cached prefix: more to come, no sample
    rows = graph_rows([decode, whole, part], SIZES)
    assert rows is not None
    assert rows.ids == [901, 100, 101, 102, 103] + [116, 117, 118, 119, 120, 121]
    assert rows.positions == [10, 0, 1, 2, 3, 16, 17, 18, 19, 20, 21]
    assert rows.tables == [decode.block_ids] + [whole.block_ids] * 4 + [part.block_ids] * 6
    assert rows.sample_rows == [0, 4]


def test_steps_that_stay_eager():
    assert graph_rows([item(20, 0, 17)], SIZES) is None  # 17 rows: past the largest graph
    assert graph_rows([item(9, 9, 1, outputs=1, prompt_logprobs=2)], SIZES) is None
    # 16 rows x (start + 16) context tokens: within the read budget at most
    start = GRAPH_PROMPT_READS // 16 - 16
    assert graph_rows([item(start + 16, start, 16)], SIZES) is not None
    assert graph_rows([item(start + 17, start + 1, 16)], SIZES) is None


def test_a_one_token_chunk_that_does_not_end_its_prompt_samples_nothing():
    rows = graph_rows([item(10, 3, 1), item(5, 5, 1, outputs=1)], SIZES)
    assert rows is not None
    assert rows.ids == [103, 900] and rows.sample_rows == [1]


def test_pending_tokens_name_their_row_of_the_previous_argmax():
    """Asynchronous scheduling: a request whose token the previous step sampled on the device
    (not read yet: its position is its length) is one row whose id names that row."""
    ahead = item(9, 10, 1, outputs=1)  # position 10: the token sampled last step, unknown yet
    decode = item(9, 10, 1, outputs=2)
    part = item(30, 16, 3)
    rows = graph_rows([ahead, decode, part], SIZES, picks=[5, None, None])
    assert rows is not None
    assert rows.ids == [from_row(5), 901, 116, 117, 118] and from_row(5) == -6
    assert rows.positions == [10, 10, 16, 17, 18] and rows.sample_rows == [0, 1]
    alone = graph_rows([ahead], SIZES, picks=[0])
    assert alone is not None and alone.ids == [-1] and alone.sample_rows == [0]
