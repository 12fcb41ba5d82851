"""Autoscaling policies: how many prefill and how many decode workers, decided separately.

Pure functions: `decide(snapshot, state, config) -> Decision`, where the snapshot holds what the
collector measured over one interval and the decision carries the next state, so policies test
on simulated traces with no cluster. The shape follows NVIDIA Dynamo's Planner (prefill scaled
on queued prompt work and time to first token, decode on KV usage, running requests and
inter-token latency, each against its SLO), with what users of such scalers asked for:

- hysteresis: separate up and down thresholds, each held for several intervals in a row;
- cooldowns after every change; bounds; at most one step (one replica) per interval;
- no scale-up while replicas are pending (scheduled but not running): they may be what is
  missing, and more would only queue behind them (dynamo#14251);
- manual edits respected: a replica count that differs from the one last set was changed by
  someone else, so it becomes the baseline and a cooldown starts (dynamo#4420).

Draining before a scale-down is the actuator's job (`cluster.autoscale.actuator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

UP, HOLD, DOWN = 1, 0, -1


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One interval's measurements. Replica counts are the actuator's (`actual` counts every
    replica asked for, `pending` those not running yet); latencies are p90s over the interval
    in seconds, None when no request produced one; token and request counts are summed over
    the role's workers; `kv_usage` is the decode workers' mean fraction of KV blocks in use."""

    time_s: float
    prefill_replicas: int
    decode_replicas: int
    prefill_pending: int = 0
    decode_pending: int = 0
    prompt_tokens_waiting: float = 0.0  # prefill workers: prompt tokens queued, not computed
    ttft_p90_s: float | None = None
    kv_usage: float = 0.0
    requests_running: float = 0.0  # decode workers
    itl_p90_s: float | None = None


@dataclass(frozen=True, slots=True)
class RolePolicy:
    """Bounds and pacing of one role. Intervals count decisions; cooldowns are seconds since
    the last change of this role's replicas (ours or a manual edit)."""

    min_replicas: int = 1
    max_replicas: int = 4
    up_intervals: int = 2  # consecutive intervals of pressure before a step up
    down_intervals: int = 6  # consecutive quiet intervals before a step down
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 120.0
    low_ratio: float = 0.5  # "quiet": below this fraction of every up threshold

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be >= 0 and <= max_replicas "
                f"({self.max_replicas})"
            )
        if self.up_intervals < 1 or self.down_intervals < 1:
            raise ValueError("up_intervals and down_intervals must be >= 1")
        if not 0 < self.low_ratio < 1:
            raise ValueError(f"low_ratio must be in (0, 1), got {self.low_ratio}")


@dataclass(frozen=True, slots=True)
class PrefillPolicy(RolePolicy):
    """Prefill: TTFT p90 against `ttft_slo_s`, and queued prompt tokens against what one
    replica clears in time (`tokens_per_replica`)."""

    ttft_slo_s: float = 2.0
    tokens_per_replica: float = 8192.0


@dataclass(frozen=True, slots=True)
class DecodePolicy(RolePolicy):
    """Decode: ITL p90 against `itl_slo_s`, mean KV usage against `kv_high`, and running
    requests against `running_per_replica` per replica."""

    itl_slo_s: float = 0.1
    kv_high: float = 0.8
    running_per_replica: float = 32.0


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """Both roles' policies, and the cooldown a manual edit starts (seconds)."""

    prefill: PrefillPolicy = field(default_factory=PrefillPolicy)
    decode: DecodePolicy = field(default_factory=DecodePolicy)
    manual_cooldown_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RoleState:
    """What one role's policy remembers between intervals."""

    target: int | None = None  # the replicas last set (None: nothing observed yet)
    up_streak: int = 0
    down_streak: int = 0
    last_change_s: float = -math.inf
    hold_until_s: float = -math.inf  # a manual edit's cooldown: no step before this time


@dataclass(frozen=True, slots=True)
class AutoscaleState:
    prefill: RoleState = field(default_factory=RoleState)
    decode: RoleState = field(default_factory=RoleState)


@dataclass(frozen=True, slots=True)
class RoleDecision:
    """`desired` replicas (within one of `current`) and why."""

    current: int
    desired: int
    reason: str

    @property
    def step(self) -> int:
        return self.desired - self.current


@dataclass(frozen=True, slots=True)
class Decision:
    prefill: RoleDecision
    decode: RoleDecision
    state: AutoscaleState


def prefill_pressure(s: Snapshot, p: PrefillPolicy) -> tuple[int, str]:
    """UP when TTFT p90 breaks its SLO or the queue outgrows the replicas; DOWN when both sit
    below `low_ratio` of their thresholds with one replica fewer; else HOLD."""
    n = s.prefill_replicas
    if s.ttft_p90_s is not None and s.ttft_p90_s > p.ttft_slo_s:
        return UP, f"TTFT p90 {s.ttft_p90_s:.3f} s > SLO {p.ttft_slo_s} s"
    if s.prompt_tokens_waiting > p.tokens_per_replica * max(n, 1):
        return UP, f"{s.prompt_tokens_waiting:.0f} prompt tokens queued"
    ttft_low = s.ttft_p90_s is None or s.ttft_p90_s < p.ttft_slo_s * p.low_ratio
    queue_low = s.prompt_tokens_waiting <= p.tokens_per_replica * (n - 1) * p.low_ratio
    if ttft_low and queue_low:
        return DOWN, "TTFT and queued prompt tokens low"
    return HOLD, "within thresholds"


def decode_pressure(s: Snapshot, p: DecodePolicy) -> tuple[int, str]:
    """UP when ITL p90 breaks its SLO, KV usage passes `kv_high` or running requests outgrow
    the replicas; DOWN when all would stay below `low_ratio` of them with one replica fewer."""
    n = s.decode_replicas
    if s.itl_p90_s is not None and s.itl_p90_s > p.itl_slo_s:
        return UP, f"ITL p90 {s.itl_p90_s:.3f} s > SLO {p.itl_slo_s} s"
    if s.kv_usage > p.kv_high:
        return UP, f"KV usage {s.kv_usage:.2f} > {p.kv_high}"
    if s.requests_running > p.running_per_replica * max(n, 1):
        return UP, f"{s.requests_running:.0f} requests running"
    if n <= 1:
        return HOLD, "one replica"
    itl_low = s.itl_p90_s is None or s.itl_p90_s < p.itl_slo_s * p.low_ratio
    kv_low = s.kv_usage * n / (n - 1) < p.kv_high * p.low_ratio
    running_low = s.requests_running < p.running_per_replica * (n - 1) * p.low_ratio
    if itl_low and kv_low and running_low:
        return DOWN, "ITL, KV usage and running requests low"
    return HOLD, "within thresholds"


def decide(snapshot: Snapshot, state: AutoscaleState, config: AutoscaleConfig) -> Decision:
    """Desired prefill and decode replicas for `snapshot`, and the state to pass next time."""
    s, c = snapshot, config
    prefill, prefill_state = decide_role(
        c.prefill, state.prefill, s.prefill_replicas, s.prefill_pending,
        prefill_pressure(s, c.prefill), s.time_s, c.manual_cooldown_s,
    )  # fmt: skip
    decode, decode_state = decide_role(
        c.decode, state.decode, s.decode_replicas, s.decode_pending,
        decode_pressure(s, c.decode), s.time_s, c.manual_cooldown_s,
    )  # fmt: skip
    return Decision(prefill, decode, AutoscaleState(prefill_state, decode_state))


def decide_role(
    policy: RolePolicy,
    state: RoleState,
    actual: int,
    pending: int,
    pressure: tuple[int, str],
    now: float,
    manual_cooldown_s: float,
) -> tuple[RoleDecision, RoleState]:
    """One role's step (-1, 0 or +1 replica) and next state."""
    if state.target is not None and actual != state.target:
        # Someone else changed the replicas: theirs is the new baseline, and a cooldown.
        adopted = RoleState(actual, 0, 0, now, now + manual_cooldown_s)
        return RoleDecision(actual, actual, f"manual edit: adopted {actual}"), adopted
    if actual < policy.min_replicas:
        return _change(actual, +1, now, f"below min {policy.min_replicas}")
    if actual > policy.max_replicas:
        return _change(actual, -1, now, f"above max {policy.max_replicas}")
    direction, why = pressure
    state = replace(
        state,
        target=actual,
        up_streak=state.up_streak + 1 if direction == UP else 0,
        down_streak=state.down_streak + 1 if direction == DOWN else 0,
    )
    hold = RoleDecision(actual, actual, why)
    if direction != HOLD and now < state.hold_until_s:
        return replace(hold, reason=f"{why}; cooling down after a manual edit"), state
    since_change = now - state.last_change_s
    if direction == UP and state.up_streak >= policy.up_intervals:
        if actual >= policy.max_replicas:
            return replace(hold, reason=f"{why}; at max {policy.max_replicas}"), state
        if pending > 0:
            return replace(hold, reason=f"{why}; {pending} pending, not scaling up"), state
        if since_change < policy.up_cooldown_s:
            return replace(hold, reason=f"{why}; in up cooldown"), state
        return _change(actual, +1, now, why)
    if direction == DOWN and state.down_streak >= policy.down_intervals:
        if actual <= policy.min_replicas:
            return replace(hold, reason=f"{why}; at min {policy.min_replicas}"), state
        if since_change < policy.down_cooldown_s:
            return replace(hold, reason=f"{why}; in down cooldown"), state
        return _change(actual, -1, now, why)
    return hold, state


def _change(actual: int, step: int, now: float, why: str) -> tuple[RoleDecision, RoleState]:
    return RoleDecision(actual, actual + step, why), RoleState(actual + step, 0, 0, now, now)
