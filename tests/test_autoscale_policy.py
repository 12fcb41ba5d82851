"""The autoscaling policies on simulated traces: one decision per interval, replicas applied
at once (as the actuators count them), latencies from a simple load model."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from cluster.autoscale.policy import (
    AutoscaleConfig,
    AutoscaleState,
    DecodePolicy,
    PrefillPolicy,
    Snapshot,
    decide,
)

INTERVAL_S = 10.0
CONFIG = AutoscaleConfig(
    prefill=PrefillPolicy(min_replicas=1, max_replicas=6, up_intervals=2, down_intervals=4,
                          up_cooldown_s=20, down_cooldown_s=60, ttft_slo_s=1.0,
                          tokens_per_replica=4000),
    decode=DecodePolicy(min_replicas=1, max_replicas=6, up_intervals=2, down_intervals=4,
                        up_cooldown_s=20, down_cooldown_s=60, itl_slo_s=0.05,
                        running_per_replica=16),
    manual_cooldown_s=60,
)  # fmt: skip

Load = Callable[[int], float]  # interval -> offered load (requests in flight, say)


def snapshot(i: int, prefill: int, decode: int, load: float, **extra) -> Snapshot:
    """Latency grows with the load each replica carries (a queue past its knee)."""
    per_prefill, per_decode = load / max(prefill, 1), load / max(decode, 1)
    return Snapshot(
        time_s=i * INTERVAL_S,
        prefill_replicas=prefill,
        decode_replicas=decode,
        prompt_tokens_waiting=max(0.0, per_prefill - 8) * 500 * prefill,
        ttft_p90_s=0.2 + 0.1 * per_prefill,
        kv_usage=min(1.0, per_decode / 20),
        requests_running=load,
        itl_p90_s=0.01 + 0.002 * per_decode,
        **extra,
    )


def simulate(load: Load, intervals: int, start=(1, 1), config=CONFIG) -> list[tuple[int, int]]:
    """(prefill, decode) replicas after each interval, each decision applied at once."""
    prefill, decode = start
    state, history = AutoscaleState(), []
    for i in range(intervals):
        decision = decide(snapshot(i, prefill, decode, load(i)), state, config)
        assert abs(decision.prefill.step) <= 1 and abs(decision.decode.step) <= 1
        prefill, decode, state = decision.prefill.desired, decision.decode.desired, decision.state
        history.append((prefill, decode))
    return history


def test_a_load_step_scales_both_roles_up_within_bounded_intervals() -> None:
    step_at = 5
    history = simulate(lambda i: 4 if i < step_at else 40, 40)
    assert history[step_at - 1] == (1, 1)  # quiet before the step
    # The SLO breaks at the step; the first replica comes after `up_intervals` intervals.
    first_up = next(i for i, (p, d) in enumerate(history) if p > 1 and d > 1)
    assert first_up - step_at + 1 <= CONFIG.prefill.up_intervals
    # Each further replica waits out the up cooldown: at most one per 2-3 intervals.
    final = history[-1]
    assert final[0] >= 4 and final[1] >= 2
    p, d = final
    assert snapshot(0, p, d, 40).ttft_p90_s <= CONFIG.prefill.ttft_slo_s
    assert snapshot(0, p, d, 40).itl_p90_s <= CONFIG.decode.itl_slo_s


def test_the_load_falling_scales_down_one_step_at_a_time_to_the_minimum() -> None:
    history = simulate(lambda i: 40 if i < 30 else 1, 80)
    top = history[29]
    assert top[0] > 1 and top[1] > 1
    after = history[30:]
    assert after[-1] == (1, 1)
    drops = [i for i in range(1, len(after)) if after[i][0] < after[i - 1][0]]
    gaps = [b - a for a, b in zip(drops, drops[1:], strict=False)]
    assert all(g * INTERVAL_S >= CONFIG.prefill.down_cooldown_s for g in gaps)


def test_a_noisy_flat_trace_does_not_flap() -> None:
    rng = random.Random(0)
    # Load around 20 in flight: two decode replicas hold it, the noise crosses thresholds.
    history = simulate(lambda i: 20 * rng.uniform(0.7, 1.3), 200, start=(3, 2))
    changes = sum(1 for a, b in zip(history, history[1:], strict=False) if a != b)
    assert changes <= 3, history


def test_pending_replicas_stop_further_scale_up() -> None:
    state = AutoscaleState()
    replicas = 1
    for i in range(10):
        s = snapshot(i, replicas, 1, 40, prefill_pending=1 if replicas > 1 else 0)
        decision = decide(s, state, CONFIG)
        state, replicas = decision.state, decision.prefill.desired
    assert replicas == 2  # the first step went; the next waits for the pending one
    assert "pending" in decision.prefill.reason
    decision = decide(snapshot(10, replicas, 1, 40), state, CONFIG)  # it runs now
    assert decision.prefill.desired == 3


def test_a_manual_edit_is_adopted_and_starts_a_cooldown() -> None:
    state = decide(snapshot(0, 2, 2, 10), AutoscaleState(), CONFIG).state  # baseline 2, 2
    # Someone scales decode to 5 by hand; the load is low, so the policy would scale down.
    decision = decide(snapshot(1, 2, 5, 2), state, CONFIG)  # at t = 10 s
    assert decision.decode.desired == 5 and "manual" in decision.decode.reason
    state = decision.state
    replicas = 5
    for i in range(2, 1 + int(CONFIG.manual_cooldown_s / INTERVAL_S)):  # t < 10 + 60
        decision = decide(snapshot(i, 1, replicas, 2), state, CONFIG)
        state = decision.state
        assert decision.decode.desired == 5, decision.decode.reason  # no fight
    for i in range(10, 30):
        decision = decide(snapshot(i, 1, replicas, 2), state, CONFIG)
        state, replicas = decision.state, decision.decode.desired
    assert replicas < 5  # after the cooldown the policy resumes from the new baseline


def test_bounds_are_held_and_restored_one_step_at_a_time() -> None:
    history = simulate(lambda i: 1000, 60)
    assert max(p for p, _ in history) == CONFIG.prefill.max_replicas
    history = simulate(lambda i: 0, 3, start=(0, 9))
    assert history == [(1, 8), (1, 7), (1, 6)]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="min_replicas"):
        PrefillPolicy(min_replicas=3, max_replicas=2)
