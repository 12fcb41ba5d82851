"""Scheduler logic on its own: budgets, chunked prefill, preemption by recompute, stops."""

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.scheduler import Scheduler


def _scheduler(num_blocks=64, block_size=4, tokens=32, seqs=8, max_len=1000) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=False)
    return Scheduler(SchedulerConfig(tokens, seqs), kv, max_len)


def _request(rid: str, prompt_len: int, max_tokens: int = 4, **kw) -> Request:
    params = SamplingParams(max_tokens=max_tokens, **kw)
    return Request(rid, list(range(1, prompt_len + 1)), params, max_tokens, eos_token_ids=(0,))


def _run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    return out, sched.update_from_output(out, sampled)


def test_chunked_prefill_respects_budget():
    sched = _scheduler(tokens=10)
    sched.add_request(_request("long", 25))
    sched.add_request(_request("short", 3))
    chunks = []
    for _ in range(3):
        out, _ = _run_step(sched)
        chunks.append([(s.request.request_id, s.num_tokens) for s in out.scheduled])
        assert out.num_batched_tokens <= 10
    assert chunks[0] == [("long", 10)]
    assert chunks[1] == [("long", 10)]
    assert chunks[2] == [("long", 5), ("short", 3)]  # prefill done: both sample
    assert sched.requests["long"].output_token_ids == [7]


def test_max_num_seqs_limits_running():
    sched = _scheduler(seqs=2)
    for i in range(4):
        sched.add_request(_request(f"r{i}", 3))
    out, _ = _run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.num_waiting() == 2


def test_preemption_recomputes_latest_request():
    sched = _scheduler(num_blocks=4, block_size=4, tokens=64)
    a, b = _request("a", 7, max_tokens=8), _request("b", 7, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    _run_step(sched)  # both prefilled: 2 blocks each, pool full
    _run_step(sched)  # token 8 of each still fits in block 2
    out, _ = _run_step(sched)  # a needs a 3rd block: b is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [7, 7]
    sched.kv.check_integrity()
    while sched.has_unfinished_requests():
        _run_step(sched)
    assert a.output_token_ids == [7] * 8 and b.output_token_ids == [7] * 8
    assert b.num_preemptions >= 1
    sched.kv.check_integrity(expect_all_free=True)


def test_stop_conditions():
    sched = _scheduler()
    sched.add_request(_request("eos", 3, max_tokens=10))
    sched.add_request(_request("min", 3, max_tokens=10, min_tokens=2))
    sched.add_request(_request("ignore", 3, max_tokens=2, ignore_eos=True))
    sched.add_request(_request("stop_id", 3, max_tokens=10, stop_token_ids=[9]))
    _, outs = _run_step(sched, token=0)
    reasons = {o.request_id: (o.finish_reason, o.stop_reason) for o in outs}
    assert reasons["eos"] == ("stop", None)
    assert reasons["min"] == (None, None)
    assert reasons["ignore"] == (None, None)
    assert reasons["stop_id"] == ("stop", None)  # eos also ends it
    _, outs = _run_step(sched, token=9)
    reasons = {o.request_id: (o.finish_reason, o.stop_reason) for o in outs}
    assert reasons["ignore"] == ("length", None)
    assert reasons["min"] == (None, None)  # 9 is not a stop token for it
    sched.kv.check_integrity()


def test_max_model_len_caps_length():
    sched = _scheduler(max_len=6)
    sched.add_request(_request("r", 4, max_tokens=100))
    _run_step(sched)
    _, outs = _run_step(sched)
    assert outs[0].finish_reason == "length"
    assert sched.kv.num_free_blocks() == 64


def test_abort_waiting_and_running():
    sched = _scheduler(seqs=1)
    sched.add_request(_request("run", 3))
    sched.add_request(_request("wait", 3))
    _run_step(sched)
    done = sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in done} == {"run", "wait"}
    assert all(r.status.finish_reason == "abort" for r in done)
    assert not sched.has_unfinished_requests()
    sched.kv.check_integrity(expect_all_free=True)


def _ids(out) -> list[tuple[str, int, bool]]:
    return [(s.request.request_id, s.num_tokens, s.pending) for s in out.scheduled]


def test_schedule_next_decides_the_step_ahead_of_the_launched_ones_tokens():
    """Asynchronous scheduling: the step after a launched one, before its tokens are read.
    A request that sampled is one token longer (pending: computed next, its id on the
    device); prompts go on in chunks; arrivals are admitted; one whose unread token reaches
    its length limit sits out; reading the tokens then lands each where it belongs."""
    sched = _scheduler(tokens=10)
    sched.add_request(_request("long", 14, max_tokens=5))
    sched.add_request(_request("short", 3, max_tokens=5))
    sched.add_request(_request("one", 2, max_tokens=1))
    first = sched.schedule()
    assert _ids(first) == [("long", 10, False)]
    second = sched.schedule_next(first)  # nothing sampled: the prompt goes on
    assert second is not None and sched.requests["long"].num_computed_tokens == 10
    assert _ids(second) == [("long", 4, False), ("short", 3, False), ("one", 2, False)]
    assert sched.update_from_output(first, {}, advanced=True) == []
    third = sched.schedule_next(second)  # all three sampled; "one" ends by its length
    assert third is not None
    assert _ids(third) == [("long", 1, True), ("short", 1, True)]
    assert all(s.samples for s in third.scheduled)
    outputs = sched.update_from_output(second, {"long": 5, "short": 6, "one": 8}, advanced=True)
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outputs] == [
        ("long", [5], None), ("short", [6], None), ("one", [8], "length"),
    ]  # fmt: skip
    assert "one" not in sched.requests
    assert [s.pending for s in third.scheduled] == [False, False]  # read: known now
    fourth = sched.schedule_next(third)
    assert fourth is not None and _ids(fourth) == [("long", 1, True), ("short", 1, True)]
    sched.update_from_output(third, {"long": 1, "short": 0}, advanced=True)  # short: eos
    assert sched.requests.keys() == {"long"}
    # the stopped request's row in the launched `fourth` is dropped when it is read
    outputs = sched.update_from_output(fourth, {"long": 2, "short": 3}, advanced=False)
    assert [o.request_id for o in outputs] == ["long"]
    assert sched.requests["long"].output_token_ids == [5, 1, 2]
    sched.finish_requests(["long"], RequestStatus.FINISHED_ABORTED)
    sched.kv.check_integrity(expect_all_free=True)


def test_schedule_next_may_preempt_a_request_whose_token_is_unread():
    """A victim's unread token is dropped: it waits to be recomputed from what it knows."""
    sched = _scheduler(num_blocks=4, block_size=4, tokens=64)
    a, b = _request("a", 7, max_tokens=8), _request("b", 7, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    first = sched.schedule()  # both prompts: 2 blocks each, the pool full
    second = sched.schedule_next(first)  # token 8 of each still fits in block 2
    assert second is not None and _ids(second) == [("a", 1, True), ("b", 1, True)]
    sched.update_from_output(first, {"a": 7, "b": 7}, advanced=True)
    third = sched.schedule_next(second)  # a needs a 3rd block: b is preempted
    assert third is not None and [r.request_id for r in third.preempted] == ["b"]
    assert _ids(third) == [("a", 1, True)]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    outputs = sched.update_from_output(second, {"a": 9, "b": 9}, advanced=True)
    assert [o.request_id for o in outputs] == ["a"] and b.output_token_ids == [7]


def test_schedule_next_leaves_handed_off_requests_to_a_synchronous_step():
    from engine.kv_connector.push import PushMetadata, PushScheduler
    from engine.request import KVHandoff

    sched = _scheduler()
    sched.connector = PushScheduler(block_size=4)
    request = _request("p", 5)
    request.kv_transfer = KVHandoff(num_cached_tokens=0)
    sched.add_request(request)
    first = sched.schedule()
    assert isinstance(first.kv_connector_metadata, PushMetadata)  # the prompt's last chunk
    assert sched.schedule_next(first) is None and request.num_computed_tokens == 0
    (out,) = sched.update_from_output(first, {"p": 9})
    assert out.handed_off and request.status == RequestStatus.HANDED_OFF
    sched.kv.check_integrity(expect_all_free=True)


def test_schedule_next_after_a_preemption_schedules_each_request_once():
    """A request sitting out (its unread token ends it) ahead of a preemption: the schedule
    goes on after the last request handled, never over one already scheduled (found by a
    randomized async-against-sync run: a request scheduled twice in one step)."""
    sched = _scheduler(num_blocks=5, block_size=4, tokens=64)
    ending = _request("e", 3, max_tokens=1)
    a, b, c = (_request(rid, 4, max_tokens=8) for rid in "abc")
    for request in (ending, a, b, c):
        sched.add_request(request)
    first = sched.schedule()  # one block each; one block left
    nxt = sched.schedule_next(first)  # "e" sits out; a takes the last block; b preempts c
    assert nxt is not None
    assert _ids(nxt) == [("a", 1, True), ("b", 1, True)]
    assert [r.request_id for r in nxt.preempted] == ["c"]
    sched.update_from_output(first, dict.fromkeys("eabc", 7), advanced=True)
    assert "e" not in sched.requests and c.output_token_ids == []
    sched.update_from_output(nxt, {"a": 8, "b": 9})
    assert a.output_token_ids == [7, 8] and b.output_token_ids == [7, 9]
    for request in (a, b, c):
        sched.finish_requests([request.request_id], RequestStatus.FINISHED_ABORTED)
    sched.kv.check_integrity(expect_all_free=True)


def test_a_launched_steps_picks_name_the_rows_of_the_requests_that_sampled():
    """`LaunchedStep.picks_for`: the same requests in the same order take the sampled rows as
    they are; otherwise each item finds its row by request id (None: it did not sample)."""
    import torch

    from engine.model_runner import LaunchedStep
    from engine.scheduler.output import ScheduledRequest

    a, b, c = (_request(rid, 4) for rid in "abc")
    item = lambda r: ScheduledRequest(r, 1, [])  # noqa: E731
    tokens = torch.zeros(8, dtype=torch.long)
    launched = LaunchedStep([item(a), item(b)], [5, 2], tokens, tokens, None)
    assert launched.picks_for([item(a), item(b)]) == [5, 2]
    assert launched.picks_for([item(b), item(a)]) == [2, 5]
    assert launched.picks_for([item(c), item(a)]) == [None, 5]
    assert launched.picks_for([item(b)]) == [2]
