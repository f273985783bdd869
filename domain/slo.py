"""SLOs, their SLIs, error-budget and burn-rate arithmetic, and the burn-rate alert fold. Pure.

One place defines what the platform promises (docs/slo.md states it for people):
- availability: 99.9% of the requests to public routes are answered without a server-side
  failure. Bad: any 5xx (a 503 because Kafka did not take the facts included) and a stream
  that broke on our side after its first byte (status 200, `error_kind` upstream_error,
  internal_error or charge_not_recorded). Good: everything else, 4xx included (the client's
  mistake or a limit doing its job spends no budget).
- ask_latency: 95% of whole (not streamed) 2xx answers of `/v1/ask` take under 1200 ms end
  to end ("p95 < 1200 ms" as a ratio SLO, so it has an error budget like any other). A
  stream's duration depends on the answer's length, so streams are not counted.

Burn rate = error ratio over a window / error budget (1 - objective): 1 spends the budget in
exactly the 30-day budget window. Alerts follow the Google SRE workbook's multi-window,
multi-burn-rate rules (chapter "Alerting on SLOs"): a rule fires while the burn rate over its
long window AND over its short window (1/12 of the long) both reach its threshold; the long
window makes it significant, the short one makes it stop soon after the burning stops.

The fold (`fold`) keeps per tenant counts in minute buckets (6 h) and hour buckets (3 days)
by event time (the RequestCompleted's occurred_at), so replaying the log gives the same
transitions at the same records, with the same ids (derived from the record that caused
them). "Now" for a tenant is its newest event time: a tenant's alerts move only with its own
traffic, and a late record is counted in its own bucket.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.events import RequestCompleted, SloBurnRateAlerted

PRODUCER = "agent:slo-burn"
BUDGET_WINDOW = timedelta(days=30)
ANONYMOUS_TENANT = "_anonymous"  # the tenant of a RequestCompleted nobody authenticated (a 401)
BROKEN_STREAM_KINDS = frozenset({"upstream_error", "internal_error", "charge_not_recorded"})
ASK_ROUTE = "/v1/ask"
MIN_REQUESTS = 10  # requests a rule's short window needs before it may fire: one failure of 3 is no page
MINUTES_KEPT = 6 * 60  # minute buckets cover the windows up to 6 h
HOURS_KEPT = 3 * 24  # hour buckets cover the 3-day window


@dataclass(frozen=True)
class Slo:
    name: str
    objective: float  # target ratio of good requests
    description: str

    @property
    def budget(self) -> float:
        """Allowed ratio of bad requests (rounded: 1 - 0.999 is 0.0010000000000000009 in floats)."""
        return round(1.0 - self.objective, 9)


AVAILABILITY = Slo("availability", 0.999, "requests answered without a server-side failure")
ASK_LATENCY = Slo("ask_latency", 0.95, "whole /v1/ask answers under 1200 ms end to end")
LATENCY_THRESHOLD_MS = 1200
SLOS: tuple[Slo, ...] = (AVAILABILITY, ASK_LATENCY)
SLO_BY_NAME: Mapping[str, Slo] = {s.name: s for s in SLOS}


@dataclass(frozen=True)
class AlertRule:
    severity: str  # page | ticket
    long_s: int
    short_s: int
    threshold: float  # burn rate both windows must reach
    budget_share: float  # share of the 30-day budget the long window spends at that rate

    @property
    def key(self) -> str:
        return f"{self.severity}/{self.long_s}"


def burn_threshold(budget_share: float, long_s: int, period: timedelta = BUDGET_WINDOW) -> float:
    """The burn rate that spends `budget_share` of the budget within `long_s`: share * period / window."""
    return round(budget_share * period.total_seconds() / long_s, 6)


# The workbook's recommended set: 2% of the budget in 1 h or 5% in 6 h pages; 10% in 3 days files a ticket.
RULES: tuple[AlertRule, ...] = (
    AlertRule("page", 3600, 300, burn_threshold(0.02, 3600), 0.02),
    AlertRule("page", 6 * 3600, 1800, burn_threshold(0.05, 6 * 3600), 0.05),
    AlertRule("ticket", 3 * 86400, 6 * 3600, burn_threshold(0.10, 3 * 86400), 0.10),
)
WINDOWS_S: tuple[int, ...] = tuple(sorted({w for r in RULES for w in (r.long_s, r.short_s)}))


def classify(route: str, status: int, latency_ms: int, streamed: bool, error_kind: str | None) -> dict[str, bool]:
    """{slo name: bad?} for each SLO that counts this request (the SQL view slo_requests says the same)."""
    out = {AVAILABILITY.name: status >= 500 or (error_kind or "") in BROKEN_STREAM_KINDS}
    if route == ASK_ROUTE and 200 <= status < 300 and not streamed:
        out[ASK_LATENCY.name] = latency_ms >= LATENCY_THRESHOLD_MS
    return out


def error_ratio(bad: int, total: int) -> float:
    return bad / total if total else 0.0


def burn_rate(bad: int, total: int, slo: Slo) -> float:
    """How fast the window spends the budget: 1 = exactly the budget over the budget window."""
    return error_ratio(bad, total) / slo.budget


def budget_remaining(bad: int, total: int, slo: Slo) -> float:
    """Share of the budget window's error budget left (negative once overspent; 1 with no traffic)."""
    return 1.0 - (bad / (slo.budget * total) if total else 0.0)


@dataclass(frozen=True)
class Counts:
    total: int = 0
    bad: int = 0


@dataclass
class SloState:
    """One tenant's counters. Buckets map an epoch minute (hour) to [total, bad] per SLO in `SLOS` order."""

    tenant: str
    now_minute: int = 0
    minutes: dict[int, list[int]] = field(default_factory=dict)
    hours: dict[int, list[int]] = field(default_factory=dict)
    firing: set[str] = field(default_factory=set)  # "slo/severity/long_s" of rules firing now
    source_partition: int = -1
    source_offset: int = -1

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "now_minute": self.now_minute,
            "minutes": [[k, *v] for k, v in sorted(self.minutes.items())],
            "hours": [[k, *v] for k, v in sorted(self.hours.items())],
            "firing": sorted(self.firing),
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SloState:
        return cls(
            tenant=data["tenant"],
            now_minute=data["now_minute"],
            minutes={row[0]: list(row[1:]) for row in data["minutes"]},
            hours={row[0]: list(row[1:]) for row in data["hours"]},
            firing=set(data["firing"]),
            source_partition=data["source_partition"],
            source_offset=data["source_offset"],
        )

    def copy(self) -> SloState:
        return replace(
            self,
            minutes={k: list(v) for k, v in self.minutes.items()},
            hours={k: list(v) for k, v in self.hours.items()},
            firing=set(self.firing),
        )

    def window(self, seconds: int) -> list[Counts]:
        """Counts per SLO over the `seconds` ending at the tenant's newest minute (hour resolution past 6 h)."""
        sums = [0] * (2 * len(SLOS))
        if seconds <= MINUTES_KEPT * 60:
            first = self.now_minute - seconds // 60
            buckets: Iterable[tuple[int, list[int]]] = self.minutes.items()
        else:
            first = self.now_minute // 60 - seconds // 3600
            buckets = self.hours.items()
        for at, values in buckets:
            if at > first:
                for i, v in enumerate(values):
                    sums[i] += v
        return [Counts(sums[2 * i], sums[2 * i + 1]) for i in range(len(SLOS))]


def _add(buckets: dict[int, list[int]], at: int, verdicts: Mapping[str, bool]) -> None:
    row = buckets.setdefault(at, [0] * (2 * len(SLOS)))
    for i, slo in enumerate(SLOS):
        bad = verdicts.get(slo.name)
        if bad is not None:
            row[2 * i] += 1
            row[2 * i + 1] += int(bad)


def _epoch_minute(at: datetime) -> int:
    return int(at.astimezone(UTC).timestamp()) // 60


def fold(
    state: SloState | None,
    event: RequestCompleted,
    partition: int,
    offset: int,
    *,
    min_requests: int = MIN_REQUESTS,
) -> tuple[SloState, list[SloBurnRateAlerted]]:
    """Count one completed request in its tenant's buckets and emit the alert transitions it causes.

    Idempotent on the source position: a record at or before the last applied offset of the
    same partition (a redelivery) changes nothing and emits nothing.
    """
    if state is None:
        state = SloState(event.tenant)
    elif partition == state.source_partition and offset <= state.source_offset:
        return state, []
    state = state.copy()  # the caller's state stays as it was
    minute = _epoch_minute(event.envelope.occurred_at)
    verdicts = classify(event.route, event.status, event.latency_ms, event.streamed, event.error_kind)
    state.now_minute = max(state.now_minute, minute)
    if minute > state.now_minute - MINUTES_KEPT:
        _add(state.minutes, minute, verdicts)
    if minute // 60 > state.now_minute // 60 - HOURS_KEPT:
        _add(state.hours, minute // 60, verdicts)
    state.minutes = {k: v for k, v in state.minutes.items() if k > state.now_minute - MINUTES_KEPT}
    state.hours = {k: v for k, v in state.hours.items() if k > state.now_minute // 60 - HOURS_KEPT}
    state.source_partition, state.source_offset = partition, offset
    return state, _transitions(state, event, partition, offset, min_requests)


def _transitions(
    state: SloState, event: RequestCompleted, partition: int, offset: int, min_requests: int
) -> list[SloBurnRateAlerted]:
    windows = {w: state.window(w) for w in WINDOWS_S}
    evaluated_at = datetime.fromtimestamp(state.now_minute * 60, UTC)
    out = []
    for i, slo in enumerate(SLOS):
        for rule in RULES:
            key = f"{slo.name}/{rule.key}"
            long, short = windows[rule.long_s][i], windows[rule.short_s][i]
            long_burn, short_burn = burn_rate(long.bad, long.total, slo), burn_rate(short.bad, short.total, slo)
            firing = short.total >= min_requests and long_burn >= rule.threshold and short_burn >= rule.threshold
            if firing == (key in state.firing):
                continue
            (state.firing.add if firing else state.firing.discard)(key)
            alert_state = "fired" if firing else "resolved"
            out.append(
                SloBurnRateAlerted(
                    envelope=event.envelope.caused_by(
                        "SloBurnRateAlerted", PRODUCER, slo.name, rule.key, alert_state, str(offset)
                    ),
                    slo=slo.name,
                    objective=slo.objective,
                    severity=rule.severity,
                    state=alert_state,
                    long_window_s=rule.long_s,
                    short_window_s=rule.short_s,
                    long_burn_rate=round(long_burn, 6),
                    short_burn_rate=round(short_burn, 6),
                    threshold=rule.threshold,
                    long_requests=long.total,
                    long_bad=long.bad,
                    short_requests=short.total,
                    short_bad=short.bad,
                    evaluated_at=evaluated_at,
                    source_partition=partition,
                    source_offset=offset,
                )
            )
    return out
